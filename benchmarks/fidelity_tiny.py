"""Fidelity table on the tiny gpt-oss fixture: per-tensor error by type, and logits against
transformers (needs the 'reference' extra).

    python benchmarks/fidelity_tiny.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from convert import convert, verify  # noqa: E402
from convert.logits import compare_logits  # noqa: E402
from tests.gpt_oss_fixture import TINY_CONFIG, write_checkpoint  # noqa: E402

ROWS = [("f32", "f32"), ("f32", "mxfp4"), ("bf16", "mxfp4"), ("f16", "mxfp4"), ("q8_0", "mxfp4"),
        ("q4_k_m", "mxfp4"), ("bf16", "bf16"), ("f16", "f16")]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = json.loads(json.dumps(TINY_CONFIG))
        cfg["rope_scaling"]["truncate"] = True  # the YaRN rounding llama.cpp applies
        src = write_checkpoint(Path(tmp) / "src", config=cfg)
        print("| --type | --experts | size (bytes) | worst non-expert matrix rel. error | "
              "experts | verify | logits rel. error vs transformers | same argmax |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        emulated = {}
        for out_type, experts in ROWS:
            out = convert(src, Path(tmp) / f"{out_type}-{experts}.gguf", out_type, experts).path
            reports = list(verify(out, src))
            worst = max(r.rel_error for r in reports if "exps.weight" not in r.name)
            exp = [r for r in reports if "exps.weight" in r.name]
            exp_text = ("bit-exact" if all(r.bit_exact for r in exp)
                        else f"rel {max(r.rel_error for r in exp):.1e}")
            rel, same = compare_logits(out, src)
            verdict = "pass" if all(r.ok for r in reports) else "FAIL"  # within the type bounds
            print(f"| {out_type} | {experts} | {out.stat().st_size:,} | {worst:.2e} | {exp_text} "
                  f"| {verdict} | {rel:.2e} | {same:.0%} |")
            if (out_type, experts) == ("f32", "mxfp4"):
                emulated[out] = compare_logits(out, src, emulate_q8_0_activations=True)
        for out, (rel, same) in emulated.items():
            print(f"\n{out.name} against a reference that rounds the expert inputs to Q8_0 as "
                  f"ggml's CPU backend does: relative error {rel:.2e}, same argmax {same:.0%}")


if __name__ == "__main__":
    main()
