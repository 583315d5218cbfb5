"""The harmony parser on scripted token streams (no model needed)."""

from __future__ import annotations

import re

import pytest

from ggufllm import Answer, Chunk
from ggufllm.harmony import HarmonyParser, HarmonyTokens
from ggufllm.harmony.parser import MAX_HEADER_BYTES

# The real o200k_harmony ids (harmony specification)
IDS = {"<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003, "<|channel|>": 200005,
       "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012}
TOKENS = HarmonyTokens.from_lookup(IDS.get)
_SPLIT = re.compile("(" + "|".join(re.escape(k) for k in IDS) + ")")


class Vocab:
    """Text becomes one token per byte, so multi-byte characters span tokens."""

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {}

    def encode(self, script: str) -> list[int]:
        ids: list[int] = []
        for part in _SPLIT.split(script):
            if part in IDS:
                ids.append(IDS[part])
            else:
                for b in part.encode("utf-8"):
                    self.pieces[b] = bytes([b])
                    ids.append(b)
        return ids

    def piece(self, token: int) -> bytes:
        return self.pieces.get(token, b"")


def run(script: str) -> tuple[Answer, HarmonyParser]:
    vocab = Vocab()
    parser = HarmonyParser(TOKENS, vocab.piece)
    chunks = []
    for tok in vocab.encode(script):
        chunks += [Chunk(d.text, d.channel) for d in parser.feed(tok)]
        if parser.done:
            break
    chunks += [Chunk(d.text, d.channel) for d in parser.finish()]
    chunks.append(Chunk("", finish_reason=parser.finish_reason or "length"))
    return Answer.from_chunks(chunks), parser


def test_table_needs_every_token():
    assert HarmonyTokens.from_lookup({"<|start|>": 1}.get) is None


def test_reasoning_then_final_answer():
    a, p = run("<|channel|>analysis<|message|>User asks capital. Easy.<|end|>"
               "<|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>")
    assert a.text == "Paris is the capital."
    assert a.reasoning == "User asks capital. Easy."
    assert a.finish_reason == "stop" and p.done


def test_end_does_not_stop_but_return_does():
    a, p = run("<|channel|>analysis<|message|>x<|end|>")
    assert not p.done and a.text == "" and a.reasoning == "x"


def test_generation_stops_at_return_and_ignores_the_rest():
    a, _ = run("<|channel|>final<|message|>A<|return|>B<|start|>assistant<|channel|>final<|message|>C")
    assert a.text == "A"


def test_tool_call_ends_with_call_and_keeps_recipient():
    a, p = run("<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>"
               '{"q": 1}<|call|>')
    assert a.finish_reason == "tool_call"
    assert a.reasoning == '{"q": 1}' and a.text == ""
    assert p.recipient == "functions.lookup"


def test_recipient_in_role_part_is_parsed():
    _, p = run("assistant to=functions.f<|channel|>commentary<|message|>{}<|call|>")
    assert p.recipient == "functions.f"


def test_reasoning_only_truncated_output():
    a, _ = run("<|channel|>analysis<|message|>thinking and thinking")
    assert a.text == "" and a.reasoning == "thinking and thinking"
    assert a.finish_reason == "length"


def test_truncated_header_yields_nothing_and_does_not_crash():
    a, _ = run("<|channel|>fin")
    assert (a.text, a.reasoning) == ("", "")


def test_truncated_final_answer_is_kept():
    a, _ = run("<|channel|>analysis<|message|>r<|end|><|start|>assistant<|channel|>final"
               "<|message|>Par")
    assert a.text == "Par"


def test_multibyte_characters_split_across_tokens():
    a, _ = run("<|channel|>final<|message|>Thủ đô của Pháp là Paris 🇫🇷<|return|>")
    assert a.text == "Thủ đô của Pháp là Paris 🇫🇷"


def test_truncated_multibyte_character_becomes_replacement_not_error():
    vocab = Vocab()
    parser = HarmonyParser(TOKENS, vocab.piece)
    ids = vocab.encode("<|channel|>final<|message|>é")[:-1]  # cut inside "é"
    out = [d.text for t in ids for d in parser.feed(t)] + [d.text for d in parser.finish()]
    assert "".join(out) == "\ufffd"


def test_unknown_channel_is_reasoning_never_answer():
    # a misspelt analysis channel must not leak reasoning into the answer
    a, _ = run("<|channel|>analysys<|message|>the user wants X<|end|>"
               "<|start|>assistant<|channel|>final<|message|>Paris<|return|>")
    assert (a.text, a.reasoning) == ("Paris", "the user wants X")


def test_missing_channel_is_treated_as_answer():
    a, _ = run("<|message|>Paris<|return|>")
    assert a.text == "Paris"


def test_missing_start_between_messages():
    a, _ = run("<|channel|>analysis<|message|>r<|end|><|channel|>final<|message|>Paris<|return|>")
    assert (a.text, a.reasoning) == ("Paris", "r")


def test_missing_end_before_next_message():
    a, _ = run("<|channel|>analysis<|message|>r<|start|>assistant<|channel|>final<|message|>"
               "Paris<|return|>")
    assert (a.text, a.reasoning) == ("Paris", "r")


def test_header_without_message_marker_overflows_into_text():
    body = "The capital of France is Paris. " * 8
    a, _ = run("<|channel|>final " + body + "<|return|>")
    assert len(body) > MAX_HEADER_BYTES
    assert a.text.startswith("The capital") and "Paris" in a.text
    assert a.text.strip() == body.strip()


def test_plain_text_without_any_header_is_not_lost():
    body = "Paris " * 40
    a, _ = run(body + "<|return|>")
    assert a.text == body


@pytest.mark.parametrize("ending", ["<|return|>", "", "<|end|>", "<|end|><|return|>"])
def test_short_headerless_answer_is_the_answer(ending):
    a, _ = run("Paris." + ending)
    assert (a.text, a.reasoning) == ("Paris.", "")


def test_constrain_then_long_text_without_message_keeps_every_byte():
    body = "The capital of France is Paris, on the Seine. " * 6
    assert len(body) > MAX_HEADER_BYTES
    a, _ = run("<|channel|>final <|constrain|>" + body + "<|return|>")
    assert a.text == body


def test_text_around_a_stray_constrain_is_kept():
    a, _ = run("Paris <|constrain|>is the capital.<|return|>")
    assert a.text == "Paris is the capital."


def test_role_word_after_start_is_not_answer_text():
    a, _ = run("<|channel|>analysis<|message|>r<|end|><|start|>assistantParis is the capital."
               "<|return|>")
    assert (a.text, a.reasoning) == ("Paris is the capital.", "r")


def test_role_word_then_long_plain_text_overflowing_the_header():
    body = "Paris is the capital of France. " * 6
    a, _ = run("<|channel|>analysis<|message|>r<|end|><|start|>assistant " + body + "<|return|>")
    assert a.text == body.lstrip()


def test_headerless_text_before_a_channel_is_answer_text():
    a, _ = run("Paris.<|channel|>analysis<|message|>r<|end|>")
    assert (a.text, a.reasoning) == ("Paris.", "r")


def test_header_text_closed_by_a_new_start_is_kept():
    a, _ = run("<|channel|>final Paris.<|start|>assistant<|channel|>analysis<|message|>r<|end|>")
    assert (a.text, a.reasoning) == ("Paris.", "r")


def test_header_closed_by_end_is_dropped_and_parsing_continues():
    a, _ = run("<|channel|>analysis<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>")
    assert a.text == "ok"


@pytest.mark.parametrize("seed", range(20))
def test_random_streams_never_crash(seed):
    import random

    rng = random.Random(seed)
    vocab_ids = list(IDS.values()) + list(range(256))
    vocab = Vocab()
    for b in range(256):
        vocab.pieces[b] = bytes([b])
    parser = HarmonyParser(TOKENS, vocab.piece)
    for _ in range(500):
        for d in parser.feed(rng.choice(vocab_ids)):
            assert isinstance(d.text, str) and d.channel in ("final", "analysis", "commentary")
    parser.finish()


class FakeModel:
    """The two vocabulary calls a reader makes, over the scripted vocabulary."""

    def __init__(self, vocab: Vocab, eog: set[int]) -> None:
        self.piece, self._eog = vocab.piece, eog

    def is_eog(self, token: int) -> bool:
        return token in self._eog


def read(script: str, stops: tuple[str, ...] = ()) -> Answer:
    from ggufllm.engine.output import HarmonyReader

    vocab = Vocab()
    ids = vocab.encode(script)
    # llama.cpp's end-of-generation set for gpt-oss: <|return|>, <|call|> (not <|end|>)
    reader = HarmonyReader(FakeModel(vocab, {200002, 200012, 199999}), TOKENS, stops)
    chunks, finish = [], None
    for t in ids:
        out, finish = reader.feed(t)
        chunks += out
        if finish:
            break
    chunks += reader.flush(finish or "length")
    chunks.append(Chunk("", finish_reason=finish or "length"))
    return Answer.from_chunks(chunks)


def test_reader_stops_on_a_stop_string_in_the_answer_only():
    a = read("<|channel|>analysis<|message|>say STOP now<|end|><|start|>assistant<|channel|>final"
             "<|message|>Paris. STOP and more<|return|>", stops=("STOP",))
    assert a.text == "Paris. " and a.reasoning == "say STOP now" and a.finish_reason == "stop"


def test_reader_releases_held_back_text_at_return():
    a = read("<|channel|>final<|message|>Paris ST<|return|>", stops=("STOP",))
    assert a.text == "Paris ST" and a.finish_reason == "stop"


def test_reader_releases_held_back_text_when_cut_by_length():
    a = read("<|channel|>final<|message|>Paris S", stops=("STOP",))
    assert a.text == "Paris S" and a.finish_reason == "length"


def test_reader_ends_at_other_end_of_generation_tokens_but_not_at_end():
    a = read("<|channel|>analysis<|message|>r<|end|><|start|>assistant<|channel|>final"
             "<|message|>ok<|endoftext|>more")
    assert (a.text, a.reasoning, a.finish_reason) == ("ok", "r", "stop")


def test_reader_keeps_headerless_answer_at_other_end_of_generation_token():
    a = read("Paris.<|endoftext|>", stops=("STOP",))
    assert (a.text, a.finish_reason) == ("Paris.", "stop")


def test_reader_keeps_window_at_other_end_of_generation_token():
    a = read("<|channel|>final<|message|>Paris ST<|endoftext|>", stops=("STOP",))
    assert (a.text, a.finish_reason) == ("Paris ST", "stop")


# -- property: random well-formed and damaged streams lose and repeat nothing ----

_ALPHABET = "abcxyz .,:!?é đ ủ 🇫🇷 日本\n"
# (header text after <|channel|>, the channel the body must land on)
_CHANNEL_HEADERS = [("final", "final"), ("analysis", "analysis"), ("summary", "analysis"),
                    ("commentary to=functions.lookup <|constrain|>json", "analysis"),
                    ("final <|constrain|>text", "final")]


def _body(rng) -> str:
    text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 60)))
    return rng.choice("PQRS") + text  # no leading space: a role word may precede it


def _script(rng) -> tuple[str, str, str]:
    """A random stream, the answer text it carries and the reasoning it carries."""
    parts: list[str] = []
    final: list[str] = []
    reasoning: list[str] = []
    n = rng.randint(1, 5)
    for i in range(n):
        if i > 0 and rng.random() < 0.7:
            parts.append("<|start|>assistant")
        body = _body(rng)
        if rng.random() < 0.15 and (i == 0 or parts[-1] in ("<|end|>", "<|start|>assistant")):
            parts.append(body)  # no header at all: answer text
            final.append(body)
        else:
            header, channel = rng.choice(_CHANNEL_HEADERS)
            parts.append(f"<|channel|>{header}<|message|>{body}")
            (final if channel == "final" else reasoning).append(body)
        last = i == n - 1
        if not last or rng.random() < 0.3:
            if rng.random() < 0.8 or last:
                parts.append("<|end|>")
            elif parts[-1].startswith("<|channel|>"):
                pass  # the next <|start|> / <|channel|> closes the message
            else:
                parts.append("<|end|>")
    ending = rng.choice(["<|return|>", "", "<|end|>"])
    return "".join(parts) + ending, "".join(final), "".join(reasoning)


class RandomSplitVocab(Vocab):
    """Text becomes tokens of 1 to 4 bytes at random cuts (inside characters too)."""

    def __init__(self, rng) -> None:
        super().__init__()
        self._rng = rng
        self._ids: dict[bytes, int] = {}

    def encode(self, script: str) -> list[int]:
        ids: list[int] = []
        for part in _SPLIT.split(script):
            if part in IDS:
                ids.append(IDS[part])
                continue
            data = part.encode("utf-8")
            i = 0
            while i < len(data):
                n = self._rng.randint(1, 4)
                piece = data[i:i + n]
                i += n
                token = self._ids.setdefault(piece, 1000 + len(self._ids))
                self.pieces[token] = piece
                ids.append(token)
        return ids


@pytest.mark.parametrize("seed", range(400))
def test_random_streams_lose_and_repeat_no_answer_byte(seed):
    import random

    rng = random.Random(seed)
    script, final, reasoning = _script(rng)
    vocab = RandomSplitVocab(rng)
    parser = HarmonyParser(TOKENS, vocab.piece)
    chunks = []
    for tok in vocab.encode(script):
        chunks += [Chunk(d.text, d.channel) for d in parser.feed(tok)]
    chunks += [Chunk(d.text, d.channel) for d in parser.finish()]
    a = Answer.from_chunks(chunks)
    assert (a.text, a.reasoning) == (final, reasoning), script


@pytest.mark.parametrize("seed", range(100))
def test_random_token_soup_never_invents_or_repeats_text(seed):
    """Any interleaving of control tokens and ASCII text: what comes out, all channels
    together, is a subsequence of the text that went in (nothing repeated or made up)."""
    import random

    rng = random.Random(seed)
    words = ["assistant", "final", "analysis", "commentary", " to=functions.f", "json", " ",
             "Paris", ".", "x" * 50, "\n"]
    controls = list(IDS)
    vocab = Vocab()
    fed: list[str] = []
    script = []
    for _ in range(rng.randint(1, 80)):
        if rng.random() < 0.3:
            script.append(rng.choice(controls))
        else:
            word = rng.choice(words)
            script.append(word)
            fed.append(word)
    parser = HarmonyParser(TOKENS, vocab.piece)
    out = []
    for tok in vocab.encode("".join(script)):
        out += [d.text for d in parser.feed(tok)]
    out += [d.text for d in parser.finish()]
    it = iter("".join(fed))
    assert all(ch in it for ch in "".join(out))
