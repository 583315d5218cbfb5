"""benchmarks/gpu_check.sh in its CPU mode, end to end: synthetic gpt-oss GGUF through the
converter's writer, both placements through the bare API and through ggufllm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ggufllm.gguf_file import read_gguf_header, tensor_array

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_end_to_end(tmp_path: Path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--workdir",
                           str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # benchmarks/concurrency.py ran (the CPU mode's 1 and 2 requests: a row each), not
    # just its heading
    rows = {line.split()[0] for line in proc.stdout.splitlines() if "/s" in line
            and line.split()[0].isdigit()}
    assert rows == {"1", "2"} and "concurrency.py failed" not in proc.stdout, proc.stdout
    model = tmp_path / "work" / "gpt-oss-small-synthetic.gguf"
    summary = read_gguf_header(model)
    assert summary.architecture == "gpt-oss" and summary.array_lengths["tokenizer.ggml.tokens"] == 201088
    for t in summary.tensors:  # random values, valid blocks: scales in a finite, small range
        blocks = np.asarray(tensor_array(summary, t))
        if t.ggml_type.name == "MXFP4":
            scales = blocks.reshape(-1, 17)[:, 0]
            assert 119 <= scales.min() and scales.max() < 124, t.name
        elif t.ggml_type.name == "Q8_0":
            d = blocks.reshape(-1, 34)[:, :2].copy().view(np.float16)
            assert np.isfinite(d).all() and (np.abs(d) < 0.01).all(), t.name
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["device"] == "CPU only" and results["auto"]["n_gpu_layers"] == 0
    for name in ("all_on_gpu", "experts_on_cpu"):
        row = results[name]
        bare, ours = row["bare"], row["ggufllm"]
        assert bare["prefill_tok_s"] > 0 and bare["decode_tok_s"] > 0 and bare["load_s"] > 0
        assert ours["tokens"] == 16 and ours["decode_tok_s"] > 0
        assert row["estimate_gpu_mib"] == 0 and row["estimate_host_mib"] > 100
    # 4 layers x (gate, up, down) x (weight, bias), as llama.cpp logged them
    assert results["experts_on_cpu"]["bare"]["expert_tensors_on_cpu"] == 24
    assert results["experts_on_cpu"]["ggufllm"]["expert_tensors_on_cpu"] == 24
    assert results["all_on_gpu"]["bare"]["expert_tensors_on_cpu"] == 0
