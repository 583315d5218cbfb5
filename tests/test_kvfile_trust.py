"""Saved KV files against forgery and loss (issue 15, item 7), on the real engine.

A file pairs prompt tokens with the K/V state computed from them, and llama.cpp cannot
tell whether the two belong together: a file must be written by this user's ggufllm
(HMAC under the per-user key) or trusted by the caller. Loading and saving must never
lose entries silently, two saves must not mix, the file is private to its owner, a
hostile header is a KVCacheError, and an eviction that cannot fit the RAM cache takes
no snapshot.

None of this depends on what the model says, so the tests run the tiny gpt-oss fixture
(``tiny_gguf("q8_0")``: a real gpt-oss file, random weights, the real o200k_harmony
tokenizer, harmony prompts): it decodes a prompt ~20 times faster than the default
Gemma. One service over it serves the module (a test of other settings loads its own),
and the children that run ``ggufllm ask`` load it with ``--model``. Its answers are
random tokens, so only counts, equalities and errors are checked. Its sliding window is
8 tokens: every document here is past it, so the saved entries carry window checkpoints
(the format's full layout). Its state is ~270 bytes a token, so the RAM-budget tests
use documents of a few thousand tokens to pass 1 MB.
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
FACT_A = "The Zorblat festival is held every spring in the town of Quenby."
FACT_B = "Mount Ferrow is the tallest peak of the Ulm range, at 4,210 metres."
# prompts of ~290 and ~370 tokens (entries of ~0.1 MB)
DOC_A, DOC_B = " ".join([FACT_A] * 10), " ".join([FACT_B] * 13)
Q_A, Q_B = "Where is the Zorblat festival held?", "How tall is Mount Ferrow?"
# ~2,100 and ~2,500 tokens: entries of ~0.56 and ~0.67 MB, each within a 1 MB RAM budget
# and not both; together, a prefix of ~4,600 tokens whose state alone passes 1 MB
LONG_A, LONG_B = " ".join([FACT_A] * 110), " ".join([FACT_B] * 120)
HUGE = LONG_A + " " + LONG_B
CTX = 6144  # every service's max_length (`ggufllm ask --ctx`): HUGE fits it
MB = 1 << 20
HEAD = struct.Struct("<IQ")
FIXED = len(kvfile.MAGIC) + HEAD.size


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> Path:
    """The tiny gpt-oss GGUF (Q8_0; made once for the run)."""
    return tiny_gguf("q8_0")


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory, machine_verdicts: Path,
             tiny: Path) -> Path:
    """The machine's verdicts and the tiny model's (its probe mark and CPU kernel verdict):
    each test's fresh cache home loads it without a probe load and a self-test (~2.4 s)."""
    from ggufllm.gguf_probe import probe_model_file
    from ggufllm.native.kernels import extra_buffers_for

    home = seed_cache_home(tmp_path_factory.mktemp("verdicts"), machine_verdicts)
    with pytest.MonkeyPatch.context() as patched:
        patched.setenv("XDG_CACHE_HOME", str(home))
        probe_model_file(tiny)
        extra_buffers_for(tiny)
    return home / "ggufllm"


@pytest.fixture(scope="module")
def service(tiny: Path, verdicts: Path) -> Iterator[LLMService]:
    """The tiny model as ``ggufllm ask -m TINY --ctx CTX`` opens it (four slots): it also
    writes the files the tests of ``ask`` start from."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setenv("XDG_CACHE_HOME", str(verdicts.parent))
        svc = LLMService(tiny, max_length=CTX)
        svc.load()
    yield svc
    svc.close()


@pytest.fixture(autouse=True)
def key_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdicts: Path) -> Path:
    """This test's user cache folder (where the KV key lives; no key in it yet)."""
    home = seed_cache_home(tmp_path / "cache-home", verdicts)
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


Checkpoints = list[tuple[int, bytes]]  # (position, window state)


@dataclasses.dataclass
class Parsed:
    """A file taken apart the way anyone can: the format is public."""

    version: int
    header: dict
    entries: list[tuple[bytes, bytes, Checkpoints]]  # (int32 tokens, state, checkpoints)
    trailer: bytes  # the sha256 of the rest, then whatever follows it

    @classmethod
    def of(cls, data: bytes) -> Parsed:
        version, n_header = HEAD.unpack_from(data, len(kvfile.MAGIC))
        header = json.loads(data[FIXED:FIXED + n_header])
        pos, entries = FIXED + n_header, []
        for n_tokens, n_state, layout in header["entries"]:
            assert layout  # past the window of 8: every entry has window checkpoints
            end = pos + 4 * n_tokens
            tokens, state, pos = data[pos:end], data[end:end + n_state], end + n_state
            checkpoints = []
            for position, n_bytes in layout:
                checkpoints.append((position, data[pos:pos + n_bytes]))
                pos += n_bytes
            entries.append((tokens, state, checkpoints))
        return cls(version, header, entries, data[pos:])

    def sizes(self) -> list[int]:
        """What each entry costs the RAM cache (tokens, state and checkpoints), in order."""
        return [len(t) + len(s) + sum(len(c) for _, c in cps) for t, s, cps in self.entries]

    def forged(self, entries: list[tuple[bytes, bytes, Checkpoints]]) -> bytes:
        """The file with other entries and a recomputed sha256; the rest of the trailer
        (what a forger cannot recompute) is left as it was."""
        header = json.dumps({"identity": self.header["identity"], "entries": [
            [len(t) // 4, len(s), [[p, len(c)] for p, c in cps]] for t, s, cps in entries]
        }).encode()
        body = (kvfile.MAGIC + HEAD.pack(self.version, len(header)) + header
                + b"".join(t + s + b"".join(c for _, c in cps) for t, s, cps in entries))
        return body + hashlib.sha256(body).digest() + self.trailer[32:]


def signed(home: Path, header: bytes, body: bytes = b"") -> bytes:
    """A file as this user's ggufllm signs it (the layout of kvfile's docstring)."""
    data = kvfile.MAGIC + HEAD.pack(kvfile.VERSION, len(header)) + header + body
    key = key_file(home).read_bytes()
    return data + hashlib.sha256(data).digest() + hmac.new(key, data, hashlib.sha256).digest()


def write_key(home: Path, key: bytes | None = None) -> bytes:
    key = secrets.token_bytes(32) if key is None else key
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
    (a_tokens, a_state, a_checkpoints), (b_tokens, _, _) = sorted(parsed.entries,
                                                                  key=lambda e: len(e[0]))
    assert len(a_tokens) >= 128 * 4 and len(b_tokens) > len(a_tokens)  # DOC_B is longer
    forged = tmp_path / "forged.kv"  # A's state and window checkpoints, B's tokens
    forged.write_bytes(parsed.forged([(b_tokens[:len(a_tokens)], a_state, a_checkpoints)]))

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
def two_long(service: LLMService, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A file of the prefixes of LONG_A and LONG_B, each within a RAM budget of 1 MB and
    not both, written once by ``service``; and the key that signed it."""
    home = tmp_path_factory.mktemp("writer")
    path = home / "two.kv"
    with pytest.MonkeyPatch.context() as patched:
        patched.setenv("XDG_CACHE_HOME", str(home))
        save(service, path, (Q_A, LONG_A), (Q_B, LONG_B))
    return path, key_file(home).read_bytes()


def two_long_of_this_user(two_long: tuple[Path, bytes], home: Path, path: Path) -> Parsed:
    """``two_long`` copied to ``path``, written by this test's user: its key is the one that
    signed it."""
    write_key(home, two_long[1])
    path.write_bytes(two_long[0].read_bytes())
    parsed = Parsed.of(path.read_bytes())
    sizes = parsed.sizes()
    assert len(sizes) == 2 and max(sizes) < MB < sum(sizes)  # each fits 1 MB, not both
    return parsed


def test_ask_leaves_the_file_alone_when_its_load_failed(tiny, service, tmp_path):
    cache = tmp_path / "doc.kv"
    save(service, cache, (Q_A, DOC_A))  # as `ask --ctx CTX` writes it (`ask` writing it: test_cli)
    before = cache.read_bytes()
    r = ask(tiny, cache, Q_A, DOC_A, "--ctx", str(CTX // 2))  # made for another --ctx
    assert "n_ctx" in r.stderr and "left unchanged" in r.stderr
    assert cache.read_bytes() == before
    cache.write_bytes(b"garbage")
    r = ask(tiny, cache, Q_A, DOC_A, "--ctx", str(CTX))
    assert "left unchanged" in r.stderr and cache.read_bytes() == b"garbage"


def test_ask_does_not_write_back_a_file_the_ram_budget_trimmed(tiny, two_long, key_home,
                                                              tmp_path):
    cache = tmp_path / "docs.kv"
    two_long_of_this_user(two_long, key_home, cache)  # as `ask --ctx CTX` writes it
    before = cache.read_bytes()
    r = ask(tiny, cache, "Who goes there?", LONG_A, "--ctx", str(CTX),
            env={"KV_CACHE_RAM_MB": "1"})
    assert "KV_CACHE_RAM_MB" in r.stderr and "left unchanged" in r.stderr
    assert cache.read_bytes() == before


def test_a_save_without_a_ram_cache_writes_what_the_slots_hold(tiny, service, tmp_path):
    path = tmp_path / "slots.kv"
    with LLMService(tiny, max_length=CTX, kv_cache_ram_mb=0) as svc:  # `service`'s identity
        svc.answer(Q_A, DOC_A, **GREEDY)
        assert svc.save_kv_cache(path) == 1
    service.clear_kv_cache()
    assert service.load_kv_cache(path) == 1
    assert service.answer("When is the Zorblat festival?", DOC_A, **GREEDY).timings.n_cached >= 128


def test_load_counts_only_what_it_kept_and_copies_only_that(tiny, two_long, key_home, tmp_path):
    """A 1 MB budget holds the newest of two prefixes (~0.56 and ~0.67 MB). The load says
    so, and copies out of the file only what it keeps (Python allocations stay below
    the file's size: before, it read the file and then copied each state out of it)."""
    path = tmp_path / "two.kv"
    parsed = two_long_of_this_user(two_long, key_home, path)
    assert parsed.sizes()[-1] < MB  # the newest fits
    # the file lists the least recently used first, whichever slots `service`'s earlier
    # tests left A and B in: B, asked last, is the newest (LONG_B is the longer prompt)
    (first, _, _), (newest, _, _) = parsed.entries
    assert len(newest) > len(first)
    question, doc = Q_B, LONG_B
    size = path.stat().st_size
    with LLMService(tiny, max_length=CTX, kv_cache_ram_mb=1) as svc:  # `service`'s identity
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
        assert svc.answer(question, doc, **GREEDY).timings.n_cached >= 128  # the newest was kept


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


def test_an_eviction_too_big_for_the_ram_budget_takes_no_snapshot(tiny, monkeypatch):
    sizes, snapshots = [], []
    real_size, real = lib.llama_state_seq_get_size_ext, lib.llama_state_seq_get_data_ext

    def measured(*args):
        sizes.append(real_size(*args))
        return sizes[-1]

    def counted(*args):
        snapshots.append(args[-2])
        return real(*args)

    monkeypatch.setattr(lib, "llama_state_seq_get_size_ext", measured)
    monkeypatch.setattr(lib, "llama_state_seq_get_data_ext", counted)
    with LLMService(tiny, max_length=CTX, n_parallel=1, kv_cache_ram_mb=1) as svc:
        svc.answer(Q_A, HUGE, **GREEDY)
        svc.answer(Q_B, DOC_B, **GREEDY)  # evicts the ~1.2 MB prefix: it cannot fit 1 MB
        info = svc.get_model_info()["kv_cache"]
    assert max(sizes) > MB  # the eviction measured it
    assert info["ram_entries"] == 0 and snapshots == []


def test_an_eviction_snapshots_the_slot_once(service):
    service.clear_kv_cache()
    service.answer(Q_A, HUGE, **GREEDY)
    engine = service._engine
    slot = next(s for s in engine.slots.slots if s.n_exact >= 128)
    tracemalloc.start()
    try:
        assert engine.scheduler.call(lambda: engine.kv_store.keep(slot))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (entry,) = engine.kv_store.cache.entries()
    assert len(entry.state) > MB and peak < 1.25 * len(entry.state)
