"""Every crafted or truncated GGUF gives ModelLoadError, and the process lives on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ggufllm import LLMService, ModelLoadError, gguf_file
from ggufllm.gguf_file import read_gguf_header
from ggufllm.gguf_probe import PROBE_ENV, probe_model_file

from .gguf_corpus import SEMANTIC, corpus, semantic_corpus, valid_spec

CORPUS = corpus()
SEMANTIC_FILES = semantic_corpus()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 20
    assert len(SEMANTIC) >= 40 and sum(c.crash is not None for c in SEMANTIC.values()) >= 20


def test_valid_file_passes(tmp_path: Path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(valid_spec().build())
    s = read_gguf_header(p, probe=False)
    assert [t.name for t in s.tensors] == ["a.weight", "b.weight"]
    assert s.tensors[1].n_bytes == 68 and s.architecture == "llama"
    assert s.array_lengths["tokenizer.ggml.tokens"] == 2 and s.context_length == 64


def test_a_header_read_again_is_parsed_again_only_when_its_bytes_changed(tmp_path: Path):
    """The header reader keeps the last summaries by path and size, checked by the header's
    hash: a file rewritten in place (same size, maybe within the clock's granularity) is
    read anew, and a crafted rewrite is refused, never answered from memory."""
    p = tmp_path / "model.gguf"
    good = valid_spec().build()
    p.write_bytes(good)
    first = read_gguf_header(p, probe=False)
    assert read_gguf_header(p, probe=False) is first  # unchanged: not parsed again
    at = good.index(b"\x40\x00\x00\x00")  # llama.context_length = 64
    with p.open("r+b") as f:
        f.seek(at)
        f.write(b"\x80")  # 128, same size
    again = read_gguf_header(p, probe=False)
    assert again is not first and again.context_length == 128
    bad = bytearray(good)
    bad[4:8] = (99).to_bytes(4, "little")  # version 99, same size
    p.write_bytes(bytes(bad))
    with pytest.raises(ModelLoadError, match="unsupported GGUF version"):
        read_gguf_header(p, probe=False)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_crafted_file_is_refused_with_a_reason(tmp_path: Path, name: str):
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(CORPUS[name])
    with pytest.raises(ModelLoadError) as err:
        read_gguf_header(p)
    assert err.value.problems and err.value.path == str(p)


SERVICE_REFUSALS = ["truncated_in_data", "huge_tensor_count", "data_past_end", "unknown_type_id",
                    "bad_magic"]


def _service_refuses(folder: Path, name: str) -> None:
    p = folder / f"{name}.gguf"
    p.write_bytes(CORPUS[name])
    svc = LLMService(p)
    with pytest.raises(ModelLoadError):
        svc.load()
    assert not svc.is_loaded


@pytest.mark.parametrize("name", SERVICE_REFUSALS)
def test_service_refuses_crafted_file(tmp_path: Path, name: str):
    _service_refuses(tmp_path, name)


def test_after_every_refusal_a_new_load_answers(tmp_path: Path, default_gguf):
    """The process stays usable: after the service refused each crafted file, a new load of
    a real model answers (one load for all of them)."""
    for name in SERVICE_REFUSALS:
        _service_refuses(tmp_path, name)
    with LLMService(default_gguf, max_length=256) as ok:
        assert ok.generate_answer("What is 2+2?", max_tokens=4, temperature=0)


def test_header_valid_but_not_a_model_is_refused_by_llama_cpp(tmp_path: Path):
    p = tmp_path / "not_a_model.gguf"
    p.write_bytes(valid_spec().build())
    with pytest.raises(ModelLoadError, match="llama.cpp refused"):
        LLMService(p).load()


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.999])
def test_truncated_real_model_is_refused(tmp_path: Path, default_gguf: Path, fraction: float):
    with default_gguf.open("rb") as f:  # only the bytes the cut file keeps
        data = f.read(int(default_gguf.stat().st_size * fraction))
    p = tmp_path / "cut.gguf"
    p.write_bytes(data)
    with pytest.raises(ModelLoadError):
        LLMService(p).load()


def test_real_model_header_summary(default_gguf: Path):
    s = read_gguf_header(default_gguf, probe=False)
    assert s.architecture == "gemma3" and s.context_length == 32768
    assert 2.6e8 < s.n_params < 2.8e8
    assert {t for t, _, _ in s.type_table()} >= {"Q8_0", "Q4_K", "F32"}


# -- semantic cases: well-formed files whose values would abort llama.cpp ----------

_CHILD = """
import sys
from ggufllm import LLMService, ModelLoadError
for p in sys.argv[1:]:
    print("START", flush=True)
    try:
        with LLMService(p, max_length=2048, n_parallel=1) as svc:
            svc.generate_answer("the", max_tokens=2, temperature=0)
        print("DONE answers", flush=True)
    except ModelLoadError:
        print("DONE refused", flush=True)
"""


def _run_child(paths: list[Path]) -> tuple[list[str], str]:
    """Outcomes of the files the child finished, and what stopped it."""
    # the static checks alone must keep it alive; no gdb backtrace if it dies
    env = {**os.environ, PROBE_ENV: "0", "GGML_NO_BACKTRACE": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], env=env,
                              capture_output=True, timeout=300)
        out, end = done.stdout, ("exit" if done.returncode >= 0
                                 else signal.Signals(-done.returncode).name)
    except subprocess.TimeoutExpired as exc:
        out, end = exc.stdout or b"", "hung"
    return [ln.split()[1] for ln in out.decode().splitlines() if ln.startswith("DONE")], end


@pytest.fixture(scope="module")
def child_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Loads every semantic case through ggufllm in child processes (one after a crash)."""
    folder = tmp_path_factory.mktemp("semantic")
    paths = []
    for name, data in SEMANTIC_FILES.items():
        (folder / f"{name}.gguf").write_bytes(data)
        paths.append(folder / f"{name}.gguf")
    outcomes: dict[str, str] = {}
    while paths:
        finished, end = _run_child(paths)
        outcomes |= {p.stem: o for p, o in zip(paths, finished, strict=False)}
        if len(finished) < len(paths):  # the next one killed or hung the child
            outcomes[paths[len(finished)].stem] = end
        paths = paths[len(finished) + 1:]
    return outcomes


@pytest.mark.parametrize("name", sorted(SEMANTIC))
def test_semantic_case_is_refused_or_answers(tmp_path: Path, name: str, child_outcomes,
                                            monkeypatch: pytest.MonkeyPatch):
    """No file kills or hangs the process: a subprocess first, then in this one."""
    assert child_outcomes[name] in ("answers", "refused"), f"{name}: {child_outcomes[name]}"
    monkeypatch.setenv(PROBE_ENV, "0")
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(SEMANTIC_FILES[name])
    case = SEMANTIC[name]
    try:
        with LLMService(p, max_length=2048, n_parallel=1) as svc:
            answer = svc.answer("the", max_tokens=2, temperature=0)
        # answers: a whole answer within its budget (text may be empty: an end token first)
        assert answer.finish_reason in ("stop", "length"), answer.finish_reason
        assert isinstance(answer.text, str) and answer.timings.n_generated <= 2
    except ModelLoadError as err:
        assert err.problems and err.path == str(p)
        if case.crash:  # refused by our check, which names the key
            assert any("tokenizer.ggml." in m or f"{case.arch}." in m for m in err.problems)
    else:
        assert case.crash is None and child_outcomes[name] == "answers"


LOAD_ABORTS = sorted(n for n, c in SEMANTIC.items() if c.crash in ("load", "prompt"))


@pytest.mark.parametrize("name", LOAD_ABORTS)
def test_probe_catches_load_aborts_the_static_check_missed(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch):
    """Second line of defence: with the static checks switched off, the probe refuses."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_file, "_semantic_problems", lambda *_: [])
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(SEMANTIC_FILES[name])
    read_gguf_header(p, probe=False)  # the static check is really off
    with pytest.raises(ModelLoadError, match="aborts on this file"):
        read_gguf_header(p, probe=True)


def test_probe_passes_once_per_file_and_gives_llama_cpp_reasons(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = tmp_path / "good.gguf"
    good.write_bytes(SEMANTIC_FILES["valid_llama"])
    probe_model_file(good)
    assert len(list((tmp_path / "cache" / "ggufllm" / "probed").iterdir())) == 1
    probe_model_file(good)  # cached: no second child
    assert len(list((tmp_path / "cache" / "ggufllm" / "probed").iterdir())) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(SEMANTIC_FILES["architecture_unknown"])
    with pytest.raises(ModelLoadError, match="unknown model architecture: 'nosuch'"):
        probe_model_file(bad)
    monkeypatch.setenv(PROBE_ENV, "0")
    with pytest.raises(ModelLoadError, match="llama.cpp refused the file"):
        LLMService(bad).load()  # without the probe: the in-process load refuses it


def test_quantization_comes_from_the_file_not_its_name(tmp_path: Path):
    from ggufllm.model_info import _quantization_name

    from .gguf_models import tiny_model

    m = tiny_model("llama").drop("general.file_type")
    p = tmp_path / "tiny-Q4_K_M.gguf"  # the name lies: every tensor is F32
    p.write_bytes(m.build())
    assert _quantization_name(p, None) == "F32"  # no general.file_type: the tensor types
    assert [_quantization_name(p, ft) for ft in (0, 1, 7, 15, 38)] == \
        ["F32", "F16", "Q8_0", "Q4_K_M", "MXFP4_MOE"]


@pytest.mark.parametrize("which", ["gemma", "smollm2", "gpt-oss"])
def test_the_longest_piece_comes_from_the_stored_token_lengths(which: str, default_gguf: Path,
                                                               smollm2_gguf: Path,
                                                               tiny_gguf) -> None:
    """``max_token_bytes`` decodes only the tokens whose stored text is longer than the longest
    piece so far: on real vocabularies (SentencePiece, byte-level BPE, o200k) the bound it
    relies on holds for every token, and it finds what decoding them all finds. Without the
    stored lengths it decodes them all itself: that fallback (the same loop whatever the
    vocabulary) is checked on the smallest vocabulary only."""
    from ggufllm.engine.native import NativeModel

    path = {"gemma": default_gguf, "smollm2": smollm2_gguf, "gpt-oss": tiny_gguf("q8_0")}[which]
    summary = read_gguf_header(path, probe=False)
    model = NativeModel(str(path), vocab_only=True)
    try:
        assert summary.token_bytes is not None and len(summary.token_bytes) == model.n_vocab
        pieces = [len(model.piece(t, special=True)) for t in range(model.n_vocab)]
        assert all(p <= int(s) for p, s in zip(pieces, summary.token_bytes, strict=True))
        assert model.max_token_bytes(summary.token_bytes) == max(4, *pieces)
        if which == "smollm2":  # 49k tokens (Gemma's 262k and o200k's 201k: ~1 s more each)
            assert model.max_token_bytes() == max(4, *pieces)
    finally:
        model.close()
