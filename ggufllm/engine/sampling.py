"""The sampler of one request, built from parts by :func:`build_sampler`, the one place that
decides them from the request's settings.

The chain, in llama.cpp's order: penalties, then greedy (temperature 0) or top-k, top-p,
min-p, temperature and a seeded draw. A grammar (eager, or lazy with trigger patterns or
tokens) is llama.cpp's own grammar sampler and comes before the whole chain. It is applied
as llama.cpp's ``common_sampler`` applies it: the chain samples first and the grammar checks
that one token; only a refused token makes the grammar mask the whole vocabulary and the
chain sample again. That is the masked distribution exactly (a refused draw is redrawn from
the allowed tokens in proportion), at the cost of a full mask only when needed: llama.cpp
decodes every token's text to mask 262k candidates, 20-30 ms a token on one core. A refused
draw masks the best candidates first (top-k needs only its k allowed ones), and a mask of
the whole vocabulary skips the tokens that probes of their first characters rule out
(:mod:`.prefixes`): 7-9x less at a JSON value's punctuation.

Only sampled tokens reach the grammar (``accept``), never the prompt; the penalties see the
prompt's last tokens too.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llama_cpp.llama_cpp as lib
import numpy as np

from ..config import GenerationConfig
from ..errors import InvalidParameterError
from .prefixes import Utf8State, build_wanted_index, named_tokens, pieces, prefix_index
from .vocab_memo import remember

if TYPE_CHECKING:
    from ..harmony import HarmonyTokens
    from ..harmony.constrain import AnswerGuide
    from ..structured.plan import GrammarSpec
    from .native import NativeContext

__all__ = ["Sampler", "build_sampler", "VocabView"]

logger = logging.getLogger(__name__)

# tokens of history the repetition penalty looks at (llama.cpp's default)
_PENALTY_LAST_N = 64
# candidates masked at a time when a draw was refused (then the whole vocabulary)
_CHUNKS = (256, 4096)
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class VocabView:
    """What a grammar needs of a model's vocabulary, read through its ``llama_vocab`` pointer."""

    def __init__(self, vocab: Any, model: Any = None) -> None:
        self.ptr = vocab
        self._model = model
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))

    @classmethod
    def of_context(cls, ctx: NativeContext) -> VocabView:
        model = lib.llama_get_model(ctx.ptr)
        return cls(lib.llama_model_get_vocab(model), model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = (lib.llama_token * (len(data) + 8))()
        n = lib.llama_tokenize(self.ptr, data, len(data), buf, len(buf), False, True)
        return list(buf[:max(n, 0)])

    def piece(self, token: int) -> bytes:
        return pieces(self.ptr, (token,))[0]

    def architecture(self) -> str | None:
        if self._model is None:
            return None
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_model_meta_val_str(self._model, b"general.architecture", buf, 64)
        return buf.value.decode() if n >= 0 else None

    def harmony(self) -> HarmonyTokens | None:
        """gpt-oss's control tokens, when this is a gpt-oss vocabulary."""
        from ..harmony import HarmonyTokens

        if self.architecture() != "gpt-oss":
            return None

        def one(text: str) -> int | None:
            ids = self.tokenize(text)
            return ids[0] if len(ids) == 1 else None

        return HarmonyTokens.from_lookup(one)

    def controls(self) -> tuple[int, ...]:
        """Control (and unknown) tokens that do not end generation: their text, which the
        grammar matches, is not what the answer shows. Read once per vocabulary."""
        return self._scan()[0]

    def eogs(self) -> tuple[int, ...]:
        """The tokens that end generation."""
        return self._scan()[1]

    def prepare(self) -> None:
        """What a grammar needs of the vocabulary and is slow to make (its control tokens,
        ~0.5 s on o200k; the probes' index once wanted, :mod:`.prefixes`): made on the
        caller's thread before a constrained request is queued, not on the decoding one."""
        self.controls()
        build_wanted_index(self.ptr, self.n_vocab, lambda: (*self.eogs(), *self.controls()))

    def _scan(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        def scan() -> tuple[tuple[int, ...], tuple[int, ...]]:
            mask = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
            controls, eogs = [], []
            for t in range(self.n_vocab):
                if lib.llama_vocab_is_eog(self.ptr, t):
                    eogs.append(t)
                elif lib.llama_vocab_get_attr(self.ptr, t) & mask:
                    controls.append(t)
            return tuple(controls), tuple(eogs)

        return remember(self.ptr, "controls", scan)


class Sampler:
    """Owns one request's llama.cpp samplers: the chain, and a grammar and a token ban
    when its answer is constrained (all freed by :meth:`close`).

    Args:
        cfg: the request's sampling settings.
        n_vocab: the vocabulary size.
        vocab: the vocabulary (needed with a grammar).
        grammar: the grammar the reply must follow, or None.
        guide: forces tokens of a harmony reply (its final channel's header), or None.
        banned_in_answer: tokens never written inside the answer (outside it, for a harmony
            reply; everywhere otherwise).
        banned_in_call: ... inside a call's arguments, when they differ (a reply that may
            answer or call).

    Raises:
        InvalidParameterError: llama.cpp could not parse the grammar.
    """

    def __init__(self, cfg: GenerationConfig, n_vocab: int, *, vocab: VocabView | None = None,
                 grammar: GrammarSpec | None = None, guide: AnswerGuide | None = None,
                 banned_in_answer: Sequence[int] = (),
                 banned_in_call: Sequence[int] | None = None) -> None:
        self._grammar = None
        self._bans = False  # tokens are banned inside the answer (masks below)
        self._vocab = vocab
        self._ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._penalized = cfg.repeat_penalty != 1.0
        for part in _chain_parts(cfg, n_vocab):
            lib.llama_sampler_chain_add(self._ptr, part)
        self._guide = guide
        if grammar is None:
            return
        assert vocab is not None
        try:
            self._grammar = _grammar_sampler(vocab, grammar)
            self._bans = bool(banned_in_answer)
            # probes rule groups of tokens out of a whole-vocabulary mask (.prefixes)
            self._named = named_tokens(grammar.gbnf)
            self._utf8 = Utf8State()
        except BaseException:
            self.close()
            raise
        self._banned_mask = np.zeros(n_vocab, dtype=bool)
        self._banned_mask[list(banned_in_answer)] = True
        self._call_mask = self._banned_mask
        if banned_in_call is not None:
            self._call_mask = np.zeros(n_vocab, dtype=bool)
            self._call_mask[list(banned_in_call)] = True
        # allowed candidates a masked draw needs: top-k's k, one for greedy, else all
        exact_topk = cfg.top_k > 0 and not self._penalized
        self._need = 1 if cfg.temperature == 0 and not self._penalized else (
            cfg.top_k if exact_topk else n_vocab)
        self._n_vocab = n_vocab
        self._data = (lib.llama_token_data * n_vocab)()
        self._view = np.frombuffer(self._data, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._cur = lib.llama_token_data_array(self._data, n_vocab, -1, False)
        self._one = (lib.llama_token_data * 1)()
        self._one_cur = lib.llama_token_data_array(self._one, 1, -1, False)

    @property
    def constrained(self) -> bool:
        return self._grammar is not None

    def accept(self, tokens: Sequence[int]) -> None:
        """Feeds the prompt's last tokens to the repetition penalty (never to the grammar)."""
        if self._penalized:
            for t in tokens[-_PENALTY_LAST_N:]:
                lib.llama_sampler_accept(self._ptr, t)

    def sample(self, ctx: NativeContext, index: int = -1) -> int:
        """Samples from the logits of batch row ``index`` and accepts the token."""
        if self._grammar is None:
            return int(lib.llama_sampler_sample(self._ptr, ctx.ptr, index))
        token = self._forced()
        if token is None:
            token = self._constrained(ctx, index)
        if self._grammar is None:  # it refused every token: dropped (see _constrained)
            return token
        lib.llama_sampler_accept(self._grammar, token)
        self._utf8.feed(self._vocab.piece(token))  # type: ignore[union-attr]
        if self._penalized:  # otherwise the chain keeps no history: nothing to tell it
            lib.llama_sampler_accept(self._ptr, token)
        if self._guide is not None:
            self._guide.observe(token)
        return token

    def _forced(self) -> int | None:
        guide = self._guide
        token = guide.forced() if guide is not None else None
        if token is not None and not self._allowed(token):
            logger.debug("the grammar refused forced token %d; sampling instead", token)
            guide.drop_forcing()  # type: ignore[union-attr]
            return None
        return token

    def _banned(self) -> np.ndarray | None:
        """The mask of the tokens banned here (None: none is)."""
        guide = self._guide
        if not self._bans or (guide is not None and not guide.in_answer):
            return None
        return self._call_mask if guide is not None and guide.in_call else self._banned_mask

    def _constrained(self, ctx: NativeContext, index: int) -> int:
        if self._penalized:  # the penalties' history must see the chosen token only
            logits = self._logits(ctx, index)
            self._fill(self._ids, logits)
            lib.llama_sampler_apply(self._ptr, ctypes.byref(self._cur))
            token = int(self._data[self._cur.selected].id)
        else:  # the chain's accept is a no-op without penalties: llama.cpp's own loop
            token = int(lib.llama_sampler_sample(self._ptr, ctx.ptr, index))
        banned = self._banned()
        if not (banned is not None and banned[token]) and self._allowed(token):
            return token
        masked = self._masked(self._logits(ctx, index))
        if masked is not None:
            return masked
        # Nothing is allowed: a lazy grammar was triggered by text it cannot continue (a call
        # to a function that is not offered). Never sample from an empty set (llama.cpp would
        # abort at the end of generation): the rest of the reply is unconstrained, and said so.
        logger.warning("the grammar allows no token here; the rest of this reply is not "
                       "constrained")
        lib.llama_sampler_free(self._grammar)
        self._grammar = None
        self._guide = None
        return int(lib.llama_sampler_sample(self._ptr, ctx.ptr, index))

    def _logits(self, ctx: NativeContext, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ptr, index),
                                     shape=(self._n_vocab,))

    def _masked(self, logits: np.ndarray) -> int | None:
        """A refused draw: the grammar masks, then the chain draws again from what is allowed.

        With top-k (or greedy) and no penalties, only the best candidates are masked, in
        growing chunks until ``top_k`` allowed ones are among them: those are the top-k of the
        allowed tokens, so the draw is the one a mask of the whole vocabulary would give (up
        to exact logit ties, whose order llama.cpp's sorts leave open; so for the probes).
        """
        n = self._n_vocab
        order: np.ndarray | None = None
        for size in (*(c for c in _CHUNKS if c < n and self._need < c), n):
            if size >= n:
                ids = self._whole_vocabulary()
            else:
                if order is None or len(order) < size:
                    part = np.argpartition(logits, n - size)[n - size:]
                    order = part[np.argsort(-logits[part], kind="stable")]
                ids = order[:size]
            banned = self._banned()
            if banned is not None:
                ids = ids[~banned[ids]]
            self._fill(ids, logits[ids])
            lib.llama_sampler_apply(self._grammar, ctypes.byref(self._cur))
            allowed = np.count_nonzero(np.isfinite(self._view["logit"][:len(ids)]))
            if size >= n or allowed >= self._need:
                break
        if not allowed:
            return None
        lib.llama_sampler_apply(self._ptr, ctypes.byref(self._cur))
        return int(self._data[self._cur.selected].id)

    def _whole_vocabulary(self) -> np.ndarray:
        """The candidates of a whole-vocabulary mask: every token, less the groups whose
        probes the grammar refuses where that proves their tokens refused (:mod:`.prefixes`)."""
        if self._named is None or not self._utf8.between_sequences:
            return self._ids
        assert self._vocab is not None
        index = prefix_index(self._vocab.ptr)
        if index is None:
            return self._ids
        keep = index.candidates(self._allows, self._named)
        return self._ids if keep is None else self._ids[keep]

    def _allows(self, ids: np.ndarray) -> np.ndarray:
        """The grammar's verdict on each of ``ids`` in its present state."""
        self._fill(ids, np.zeros(len(ids), dtype=np.float32))
        lib.llama_sampler_apply(self._grammar, ctypes.byref(self._cur))
        return np.isfinite(self._view["logit"][:len(ids)])

    def _fill(self, ids: np.ndarray, logits: np.ndarray) -> None:
        k = len(ids)
        view = self._view
        view["id"][:k] = ids
        view["logit"][:k] = logits
        view["p"][:k] = 0.0
        cur = self._cur
        cur.size, cur.selected, cur.sorted = k, -1, False

    def _allowed(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._one_cur.size, self._one_cur.selected, self._one_cur.sorted = 1, -1, False
        lib.llama_sampler_apply(self._grammar, ctypes.byref(self._one_cur))
        return not math.isinf(self._one[0].logit)

    def close(self) -> None:
        for name in ("_grammar", "_ptr"):
            ptr = getattr(self, name)
            if ptr:
                lib.llama_sampler_free(ptr)
                setattr(self, name, None)


def _chain_parts(cfg: GenerationConfig, n_vocab: int) -> list[Any]:
    """The chain's samplers for ``cfg``, in order."""
    parts = []
    if cfg.repeat_penalty != 1.0:
        parts.append(lib.llama_sampler_init_penalties(n_vocab, _PENALTY_LAST_N,
                                                      cfg.repeat_penalty, 0.0, 0.0))
    if cfg.temperature == 0:
        return parts + [lib.llama_sampler_init_greedy()]
    if cfg.top_k > 0:
        parts.append(lib.llama_sampler_init_top_k(cfg.top_k))
    if cfg.top_p < 1.0:
        parts.append(lib.llama_sampler_init_top_p(cfg.top_p, 1))
    if cfg.min_p > 0:
        parts.append(lib.llama_sampler_init_min_p(cfg.min_p, 1))
    parts.append(lib.llama_sampler_init_temp(cfg.temperature))
    seed = lib.LLAMA_DEFAULT_SEED if cfg.seed is None else cfg.seed
    parts.append(lib.llama_sampler_init_dist(seed))
    return parts


def _grammar_sampler(vocab: VocabView, spec: GrammarSpec) -> Any:
    gbnf, root = spec.gbnf.encode(), spec.root.encode()
    if spec.lazy:
        patterns = [p.encode() for p in spec.trigger_patterns]
        c_patterns = (ctypes.c_char_p * max(1, len(patterns)))(*patterns)
        c_tokens = (lib.llama_token * max(1, len(spec.trigger_tokens)))(*spec.trigger_tokens)
        ptr = lib.llama_sampler_init_grammar_lazy_patterns(
            vocab.ptr, gbnf, root, c_patterns, len(patterns), c_tokens,
            len(spec.trigger_tokens))
    else:
        ptr = lib.llama_sampler_init_grammar(vocab.ptr, gbnf, root)
    if not ptr:
        raise InvalidParameterError("llama.cpp could not parse the answer's grammar (see the "
                                    "debug log)", "response_format")
    return ptr


def build_sampler(cfg: GenerationConfig, ctx: NativeContext, n_vocab: int) -> Sampler:
    """The sampler of one request: the chain ``cfg`` describes, and the grammar (and, for
    gpt-oss, the guide) of its ``response_format``.

    Raises:
        InvalidParameterError, UnsupportedSchemaError: the grammar cannot be built.
    """
    fmt = cfg.response_format
    calls = cfg.tools and cfg.tool_choice != "none"
    if fmt is None and not calls:
        return Sampler(cfg, n_vocab)
    from ..structured.plan import plan_reply

    vocab = VocabView.of_context(ctx)
    plan = plan_reply(fmt, cfg.tools or (), cfg.tool_choice, max_tokens=cfg.max_tokens,
                      reasoning_budget=cfg.reasoning_budget, harmony=vocab.harmony(),
                      tokenize=vocab.tokenize, piece=vocab.piece, controls=vocab.controls,
                      eogs=vocab.eogs)
    if plan is None:
        return Sampler(cfg, n_vocab)
    return Sampler(cfg, n_vocab, vocab=vocab, grammar=plan.grammar, guide=plan.guide,
                   banned_in_answer=plan.banned_in_answer, banned_in_call=plan.banned_in_call)
