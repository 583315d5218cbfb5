"""``ggufllm doctor`` on a machine without a GPU: plain words, exit 0, the real devices."""

from __future__ import annotations

import json

import llama_cpp.llama_cpp as lib
import pytest
from click.testing import CliRunner

from ggufllm.cli import cli
from ggufllm.gpu.devices import backends, devices

pytestmark = pytest.mark.skipif(bool(lib.llama_supports_gpu_offload()),
                                reason="checks the CPU build's report")


def test_doctor_says_plainly_there_is_no_gpu_and_exits_0(default_gguf):
    result = CliRunner().invoke(cli, ["doctor", "-m", str(default_gguf)])
    assert result.exit_code == 0, result.output
    assert "No GPU: this llama-cpp-python build has no GPU backend" in result.output
    assert "llama-cpp-python 0.3.36" in result.output
    assert "placement: no GPU: everything on the CPU" in result.output
    assert "backend install --preset cuda" in result.output


def test_doctor_json_reports_devices_backends_and_the_plan(default_gguf):
    result = CliRunner().invoke(cli, ["doctor", "--json", "-m", str(default_gguf),
                                      "--max-length", "2048"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr may carry the kernel self-test notice
    assert report["gpu"] is False and report["gpu_offload_compiled_in"] is False
    assert report["backends"] == backends() and "CPU" in report["backends"]
    cpu = [d for d in report["devices"] if d["kind"] == "cpu"]
    assert cpu and cpu[0]["total_mib"] > 0 and cpu[0]["total_mib"] == round(
        devices()[0].total_bytes / 2**20)
    plan = report["placement"]
    assert plan["n_gpu_layers"] == 0 and plan["estimate"]["device_mib"]["total"] == 0
    assert plan["estimate"]["host_mib"]["weights"] > 200  # Gemma 3 270M: ~248 MiB
    assert report["settings"]["max_length"] == 2048


def test_doctor_without_a_model_still_exits_0(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_MODEL_PATH", str(tmp_path / "nothing-here"))
    result = CliRunner().invoke(cli, ["doctor", "--json", "-m", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr may carry the kernel self-test notice
    assert report["model"] is None and report["model_error"]
