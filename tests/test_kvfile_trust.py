"""Saved KV files against forgery and loss (issue 15, item 7), on the real engine.

A file pairs prompt tokens with the K/V state computed from them, and llama.cpp cannot
tell whether the two belong together: a file must be written by this user's ggufllm
(HMAC under the per-user key) or trusted by the caller. Loading and saving must never
lose entries silently, two saves must not mix, the file is private to its owner, a
hostile header is a KVCacheError, and an eviction that cannot fit the RAM cache takes
no snapshot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import stat
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import llama_cpp.llama_cpp as lib
import pytest

from ggufllm import KVCacheError, KVCacheMismatchError, KVCacheUntrustedError, LLMService
from ggufllm.engine import kvfile

from .conftest import seed_cache_home

ROOT = Path(__file__).resolve().parent.parent
GREEDY = dict(temperature=0.0, max_tokens=4)
# ~190 and ~250 prompt tokens: inside Gemma's window of 512, so their prefixes are kept
DOC_A = " ".join(["The Zorblat festival is held every spring in the town of Quenby."] * 10)
DOC_B = " ".join(["Mount Ferrow is the tallest peak of the Ulm range, at 4,210 metres."] * 13)
Q_A, Q_B = "Where is the Zorblat festival held?", "How tall is Mount Ferrow?"
HEAD = struct.Struct("<IQ")
FIXED = len(kvfile.MAGIC) + HEAD.size


@pytest.fixture(autouse=True)
def key_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine_verdicts: Path) -> Path:
    """This test's user cache folder (where the KV key lives; no key in it yet)."""
    home = seed_cache_home(tmp_path / "cache-home", machine_verdicts)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def key_file(home: Path) -> Path:
    return home / "ggufllm" / "kv-key"


def save(svc: LLMService, path: Path, *questions: tuple[str, str]) -> None:
    """A file of the prefixes of these (question, document) prompts."""
    svc.clear_kv_cache()
    for question, doc in questions:
        svc.answer(question, doc, **GREEDY)
    assert svc.save_kv_cache(path) == len(questions)


@dataclasses.dataclass
class Parsed:
    """A file taken apart the way anyone can: the format is public."""

    version: int
    header: dict
    entries: list[tuple[bytes, bytes]]  # (int32 tokens, state)
    trailer: bytes  # the sha256 of the rest, then whatever follows it

    @classmethod
    def of(cls, data: bytes) -> Parsed:
        version, n_header = HEAD.unpack_from(data, len(kvfile.MAGIC))
        header = json.loads(data[FIXED:FIXED + n_header])
        pos, entries = FIXED + n_header, []
        for n_tokens, n_state, checkpoints in header["entries"]:
            assert checkpoints == []  # these documents fit the window: no checkpoints
            end = pos + 4 * n_tokens
            entries.append((data[pos:end], data[end:end + n_state]))
            pos = end + n_state
        return cls(version, header, entries, data[pos:])

    def forged(self, entries: list[tuple[bytes, bytes]]) -> bytes:
        """The file with other entries and a recomputed sha256; the rest of the trailer
        (what a forger cannot recompute) is left as it was."""
        header = json.dumps({"identity": self.header["identity"],
                             "entries": [[len(t) // 4, len(s), []] for t, s in entries]}).encode()
        body = (kvfile.MAGIC + HEAD.pack(self.version, len(header)) + header
                + b"".join(t + s for t, s in entries))
        return body + hashlib.sha256(body).digest() + self.trailer[32:]


def signed(home: Path, header: bytes, body: bytes = b"") -> bytes:
    """A file as this user's ggufllm signs it (the layout of kvfile's docstring)."""
    data = kvfile.MAGIC + HEAD.pack(kvfile.VERSION, len(header)) + header + body
    key = key_file(home).read_bytes()
    return data + hashlib.sha256(data).digest() + hmac.new(key, data, hashlib.sha256).digest()


def write_key(home: Path) -> bytes:
    key = secrets.token_bytes(32)
    key_file(home).parent.mkdir(parents=True, exist_ok=True)
    key_file(home).write_bytes(key)
    key_file(home).chmod(0o600)
    return key


# -- (a) authenticity -----------------------------------------------------------------


def test_a_file_pairing_one_documents_state_with_anothers_tokens_is_refused(service, tmp_path):
    """The attack: document A's state under document B's tokens, the sha256 recomputed.
    Loaded, questions about B would reuse A's cells (invisible prompt injection)."""
    path = tmp_path / "two.kv"
    save(service, path, (Q_A, DOC_A), (Q_B, DOC_B))
    parsed = Parsed.of(path.read_bytes())
    (a_tokens, a_state), (b_tokens, _) = sorted(parsed.entries, key=lambda e: len(e[0]))
    assert len(a_tokens) >= 128 * 4 and len(b_tokens) > len(a_tokens)  # DOC_B is longer
    forged = tmp_path / "forged.kv"
    forged.write_bytes(parsed.forged([(b_tokens[:len(a_tokens)], a_state)]))

    service.clear_kv_cache()
    with pytest.raises(KVCacheUntrustedError, match="trusted=True") as info:
        service.load_kv_cache(forged)
    assert isinstance(info.value, KVCacheError) and info.value.path == str(forged)
    assert service.get_model_info()["kv_cache"]["ram_entries"] == 0
    assert service.answer(Q_B, DOC_B, **GREEDY).timings.n_cached == 0


def test_another_users_file_is_refused_unless_trusted(service, tmp_path, key_home, monkeypatch):
    path = tmp_path / "a.kv"
    save(service, path, (Q_A, DOC_A))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-machine"))
    service.clear_kv_cache()
    with pytest.raises(KVCacheUntrustedError, match="trusted=True"):
        service.load_kv_cache(path)
    assert service.get_model_info()["kv_cache"]["ram_entries"] == 0

    damaged = tmp_path / "damaged.kv"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(KVCacheError, match="corrupt") as info:  # trust does not skip integrity
        service.load_kv_cache(damaged, trusted=True)
    assert not isinstance(info.value, KVCacheUntrustedError)

    assert service.load_kv_cache(path, trusted=True) == 1
    assert service.answer("When is the Zorblat festival?", DOC_A, **GREEDY).timings.n_cached >= 128


def test_the_key_is_made_once_private_and_never_overwritten(service, tmp_path, monkeypatch):
    from ggufllm.engine.kvkey import user_key

    key_home = tmp_path / "empty-home"  # no ggufllm folder yet: the key makes it
    monkeypatch.setenv("XDG_CACHE_HOME", str(key_home))
    keys: list[bytes] = []
    start = threading.Barrier(8)

    def make() -> None:
        start.wait()
        keys.append(user_key())

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = key_file(key_home)
    assert len(set(keys)) == 1 and keys[0] == path.read_bytes() and len(keys[0]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["kv-key"]  # no temporary file left
    save(service, tmp_path / "a.kv", (Q_A, DOC_A))
    assert path.read_bytes() == keys[0]

    other = tmp_path / "other-home"
    mine = write_key(other)  # a key that exists is used as it is
    monkeypatch.setenv("XDG_CACHE_HOME", str(other))
    assert user_key() == mine


def test_an_old_format_file_is_a_clear_mismatch(service, tmp_path):
    identity = dataclasses.asdict(service._engine.kv_store.identity)
    header = json.dumps({"identity": identity, "entries": []}).encode()
    data = kvfile.MAGIC + HEAD.pack(1, len(header)) + header
    old = tmp_path / "v1.kv"
    old.write_bytes(data + hashlib.sha256(data).digest())
    with pytest.raises(KVCacheMismatchError, match=r"format 1\b.*save it again"):
        service.load_kv_cache(old)


# -- (b) loss ---------------------------------------------------------------------------


def ggufllm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ggufllm.cli", *args], capture_output=True,
                          text=True, input="", timeout=300, env=full_env)


def ask(model: Path, cache: Path, question: str, doc: str, *extra: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = ggufllm("ask", question, "--context", doc, "-m", str(model), "--json", "--temperature",
                "0", "--max-tokens", "4", "--kv-cache", str(cache), *extra, env=env)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def ask_twin(default_gguf) -> Iterator[LLMService]:
    """A service as ``ggufllm ask --ctx 1024`` opens it: it writes the files the tests of
    ``ask`` start from (two CLI runs fewer; ``ask`` writing its file is test_cli's)."""
    with LLMService(default_gguf, max_length=1024, n_parallel=4) as svc:
        yield svc


def test_ask_leaves_the_file_alone_when_its_load_failed(default_gguf, ask_twin, tmp_path):
    cache = tmp_path / "doc.kv"
    save(ask_twin, cache, (Q_A, DOC_A))  # as `ask` writes it (the next test: `ask` loads it)
    before = cache.read_bytes()
    r = ask(default_gguf, cache, Q_A, DOC_A, "--ctx", "2048")  # made for another --ctx
    assert "n_ctx" in r.stderr and "left unchanged" in r.stderr
    assert cache.read_bytes() == before
    cache.write_bytes(b"garbage")
    r = ask(default_gguf, cache, Q_A, DOC_A, "--ctx", "1024")
    assert "left unchanged" in r.stderr and cache.read_bytes() == b"garbage"


def test_ask_does_not_write_back_a_file_the_ram_budget_trimmed(default_gguf, ask_twin, tmp_path):
    cache = tmp_path / "docs.kv"
    save(ask_twin, cache, (Q_A, DOC_A), (Q_B, DOC_B))
    before = cache.read_bytes()
    assert len(Parsed.of(before).entries) == 2  # ~3.5 and ~5.9 MB
    r = ask(default_gguf, cache, "Who goes there?", DOC_A, "--ctx", "1024",
            env={"KV_CACHE_RAM_MB": "7"})
    assert "KV_CACHE_RAM_MB" in r.stderr and "left unchanged" in r.stderr
    assert cache.read_bytes() == before


def test_a_save_without_a_ram_cache_writes_what_the_slots_hold(default_gguf, tmp_path):
    path = tmp_path / "slots.kv"
    with LLMService(default_gguf, max_length=1024, n_parallel=1, kv_cache_ram_mb=0) as svc:
        svc.answer(Q_A, DOC_A, **GREEDY)
        assert svc.save_kv_cache(path) == 1
    with LLMService(default_gguf, max_length=1024, n_parallel=1) as svc:
        assert svc.load_kv_cache(path) == 1
        assert svc.answer("When is the Zorblat festival?", DOC_A, **GREEDY).timings.n_cached >= 128


def test_load_counts_only_what_it_kept_and_copies_only_that(default_gguf, tmp_path):
    """A 7 MB budget holds the newest of two prefixes (~3.5 and ~5.9 MB). The load says
    so, and copies out of the file only what it keeps (Python allocations stay below
    the file's size: before, it read the file and then copied each state out of it)."""
    path = tmp_path / "two.kv"
    with LLMService(default_gguf, max_length=1024, n_parallel=2) as svc:
        save(svc, path, (Q_A, DOC_A), (Q_B, DOC_B))
    sizes = [len(t) + len(s) for t, s in Parsed.of(path.read_bytes()).entries]
    assert sizes[-1] < 7 << 20 < sum(sizes)
    size = path.stat().st_size
    with LLMService(default_gguf, max_length=1024, n_parallel=2, kv_cache_ram_mb=7) as svc:
        svc.load()
        tracemalloc.start()
        try:
            kept = svc.load_kv_cache(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        info = svc.get_model_info()["kv_cache"]
        assert kept == info["ram_entries"] == 1 and info["ram_load_skipped"] == 1
        assert peak < 0.75 * size
        assert svc.answer(Q_B, DOC_B, **GREEDY).timings.n_cached >= 128  # the newest was kept


# -- (c) two saves, and who can read the file ----------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fds")
def test_two_saves_to_one_path_at_once_both_succeed(service, tmp_path, monkeypatch):
    path = tmp_path / "shared.kv"
    save(service, path, (Q_A, DOC_A))
    real_fsync, both_writing = os.fsync, threading.Barrier(2, timeout=60)
    temporary = os.path.join(os.path.realpath(tmp_path), f".{path.name}")

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(temporary):
            both_writing.wait()  # each temporary file is written; none renamed yet
        real_fsync(fd)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.save_kv_cache(path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with monkeypatch.context() as patched:
        patched.setattr(kvfile.os, "fsync", fsync)
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-home", "shared.kv"]
    service.clear_kv_cache()
    assert service.load_kv_cache(path) == 1


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fds")
def test_a_saved_file_and_its_temporary_file_are_private(service, tmp_path, monkeypatch):
    path = tmp_path / "private.kv"
    modes: list[int] = []  # of the temporary files, when they are written
    real_fsync = os.fsync
    temporary = os.path.join(os.path.realpath(tmp_path), f".{path.name}")

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(temporary):
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    old_umask = os.umask(0o022)
    try:
        monkeypatch.setattr(kvfile.os, "fsync", fsync)
        save(service, path, (Q_A, DOC_A))
        assert modes == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o600)
        assert service.save_kv_cache(path) == 1
        assert modes == [0o600] * 2 and stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


# -- (d) hostile headers --------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    b'{"identity": ID, "entries": [[Infinity, 100]]}',
    b'{"identity": ID, "entries": [[1e999, 100]]}',
    b'{"identity": ID, "entries": [[NaN, 100]]}',
    b'{"identity": ID, "entries": [[true, 100]]}',
    b'{"identity": ID, "entries": "ab"}',
    b'{"identity": ID, "entries": [[100, 100]], "entries": []}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"identity": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001 + b', "entries": []}',
    b"\xff\xfe",
], ids=["Infinity", "1e999", "NaN", "bool", "string", "twice", "deep-list", "deep-dict",
        "not-utf8"])
def test_a_hostile_header_is_a_kv_cache_error(service, tmp_path, key_home, header):
    """Signed with this user's key, so that it reaches the header parser."""
    identity = json.dumps(dataclasses.asdict(service._engine.kv_store.identity)).encode()
    write_key(key_home)
    path = tmp_path / "hostile.kv"
    path.write_bytes(signed(key_home, header.replace(b"ID", identity)))
    with pytest.raises(KVCacheError, match="header"):
        service.load_kv_cache(path)


# -- (e) eviction -----------------------------------------------------------------------------


def test_an_eviction_too_big_for_the_ram_budget_takes_no_snapshot(default_gguf, monkeypatch):
    snapshots = []
    real = lib.llama_state_seq_get_data_ext

    def counted(*args):
        snapshots.append(args[-2])
        return real(*args)

    monkeypatch.setattr(lib, "llama_state_seq_get_data_ext", counted)
    with LLMService(default_gguf, max_length=1024, n_parallel=1, kv_cache_ram_mb=1) as svc:
        svc.answer(Q_A, DOC_A, **GREEDY)
        svc.answer(Q_B, DOC_B, **GREEDY)  # evicts A's ~3.5 MB prefix: it cannot fit 1 MB
        info = svc.get_model_info()["kv_cache"]
    assert info["ram_entries"] == 0 and snapshots == []


def test_an_eviction_snapshots_the_slot_once(service):
    service.clear_kv_cache()
    service.answer(Q_A, DOC_A, **GREEDY)
    engine = service._engine
    slot = next(s for s in engine.slots.slots if s.n_exact >= 128)
    tracemalloc.start()
    try:
        assert engine.scheduler.call(lambda: engine.kv_store.keep(slot))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (entry,) = engine.kv_store.cache.entries()
    assert len(entry.state) > 1 << 20 and peak < 1.25 * len(entry.state)
