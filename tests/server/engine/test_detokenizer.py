"""Streaming detokenization and stop sequences, on the tests' byte-level BPE (`tokenizer`) and on the default
model's real tokenizer (a real-model test: it needs the model's package)."""

# Multilingual samples are the point here, look-alike characters included.
# ruff: noqa: RUF001

from __future__ import annotations

import random
from typing import Any

import pytest

from quiver.server.engine.detokenizer import TextStream

TEXTS = [
    "Héllo wörld! Ça va? naïve café, Straße — “quotes” … done.",
    "日本語のテキストと中文的文本，还有한국어 문장입니다。",
    "Emoji: 🎉🚀 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫√.",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก",
    "def f(x):\n    return x ** 2  # ≥ 0\n\n\tprint(f'{x!r}')\n",
]


@pytest.fixture(params=["text", pytest.param("smollm2", marks=pytest.mark.real_model)])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "text":
        return request.getfixturevalue("text_tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(request.getfixturevalue("default_checkpoint"))


def _stream(tok: Any, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[list[str], int, bool]:
    """Push ids until a stop; returns the chunks (finish() last unless stopped), ids pushed, stopped."""
    stream = TextStream(tok, stops)
    chunks, pushed = [], 0
    for token in ids:
        chunks.append(stream.push(token))
        pushed += 1
        if stream.stopped:
            return chunks, pushed, True
    chunks.append(stream.finish())
    # A stop ending in U+FFFD can only show once finish() decodes the incomplete tail.
    return chunks, pushed, stream.stopped


def _reference(tok: Any, ids: list[int], stops: tuple[str, ...]) -> str:
    text: str = tok.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


@pytest.mark.parametrize("text", TEXTS)
def test_multilingual_text_streams_back_whole_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    chunks, _, stopped = _stream(tokenizer, ids)
    assert not stopped
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in c for c in chunks)


def test_characters_split_across_tokens_are_held_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXTS[2])
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "needs a character split over tokens"
    stream, sent = TextStream(tokenizer), ""
    for k, token in enumerate(ids, start=1):
        sent += stream.push(token)
        prefix = tokenizer.decode(ids[:k])
        # Text goes out as soon as it ends on a whole character, and never before.
        if prefix.endswith("\ufffd"):
            assert prefix.startswith(sent) and len(sent) < len(prefix)
        else:
            assert sent == prefix


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    body = tokenizer.encode("Hello there, 世界!")
    specials = tokenizer.all_special_ids
    ids = [specials[0], *body[:3], specials[1], *body[3:], tokenizer.eos_token_id]
    chunks, _, _ = _stream(tokenizer, ids)
    assert "".join(chunks) == tokenizer.decode(body) == "Hello there, 世界!"


def test_finish_flushes_an_incomplete_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🎉")
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    chunks, _, _ = _stream(tokenizer, ids[:cut])
    assert chunks[-1].endswith("\ufffd")
    assert "".join(chunks) == tokenizer.decode(ids[:cut])


def test_stop_sequence_spanning_tokens(tokenizer: Any) -> None:
    text = "The answer is 42. Next question: what is life?"
    ids = tokenizer.encode(text)
    stop = "42. Next"
    assert not any(stop in tokenizer.decode([i]) for i in ids), "the stop must span tokens"
    chunks, pushed, stopped = _stream(tokenizer, ids, (stop,))
    assert stopped
    assert "".join(chunks) == "The answer is "
    # Stopped at the token that completes the stop sequence, not later.
    assert stop in tokenizer.decode(ids[:pushed]) and stop not in tokenizer.decode(ids[: pushed - 1])


def test_stop_at_the_very_first_token(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world")
    first = tokenizer.decode(ids[:1])
    chunks, pushed, stopped = _stream(tokenizer, ids, (first,))
    assert (chunks, pushed, stopped) == ([""], 1, True)


def test_text_after_the_stop_in_the_same_token_is_dropped(tokenizer: Any) -> None:
    ids = tokenizer.encode("alpha beta gamma")
    chunks, _, stopped = _stream(tokenizer, ids, ("et",))
    assert stopped and "".join(chunks) == "alpha b"


def test_diverging_stop_prefix_is_held_then_released(tokenizer: Any) -> None:
    text = "Say The End then The Endgame."
    ids = tokenizer.encode(text)
    stops = ("The End!", "zzz")
    stream, sent, held = TextStream(tokenizer, stops), "", False
    for k, token in enumerate(ids, start=1):
        sent += stream.push(token)
        assert not stream.stopped
        decoded = tokenizer.decode(ids[:k])
        if decoded.endswith(" The End"):
            held = True
            assert sent == decoded[: -len("The End")], "a possible stop start must be held back"
    sent += stream.finish()
    assert held
    assert sent == text


def test_earliest_of_several_stops_wins(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four")
    chunks, _, stopped = _stream(tokenizer, ids, ("four", "o thr", "two three"))
    assert stopped and "".join(chunks) == "one "


def test_push_after_stop_is_refused(tokenizer: Any) -> None:
    ids = tokenizer.encode("a b c")
    stream = TextStream(tokenizer, ("b",))
    while not stream.stopped:
        stream.push(ids.pop(0))
    assert stream.finish() == ""
    with pytest.raises(RuntimeError):
        stream.push(ids[0])


class _CountingTokenizer:
    """Records the longest id list decoded, to check the per-token cost stays bounded."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.longest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        text: str = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


def test_decoding_cost_does_not_grow_with_length(tokenizer: Any) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 8)
    assert len(ids) > 1000
    counting = _CountingTokenizer(tokenizer)
    chunks, _, _ = _stream(counting, ids, ("never appears",))
    assert "".join(chunks) == tokenizer.decode(ids)
    assert counting.longest <= 8


def _random_case(tok: Any, rng: random.Random) -> tuple[list[int], tuple[str, ...]]:
    vocab, kind = len(tok), rng.randrange(3)
    if kind == 0:  # arbitrary ids: invalid UTF-8, special tokens, anything
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
    elif kind == 1:  # real multilingual text with some tokens replaced
        ids = [t if rng.random() > 0.1 else rng.randrange(vocab) for t in tok.encode(rng.choice(TEXTS))]
    else:  # dense in special tokens and in the raw single-byte tokens that split characters
        pool = [*tok.all_special_ids, *range(180, 260)]
        ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(30)]
    text = tok.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(rng.randrange(4) if text else 0):  # stops cut from the text itself, so they occur
        start = rng.randrange(len(text))
        stops.append(text[start : start + rng.randint(1, 8)])
    if rng.random() < 0.3:
        stops.append("no such stop")
    return ids, tuple(stops)


@pytest.mark.parametrize("block", range(4))
def test_stream_equals_full_decode_cut_at_first_stop(tokenizer: Any, block: int) -> None:
    for seed in range(block * 500, (block + 1) * 500):
        ids, stops = _random_case(tokenizer, random.Random(seed))
        chunks, pushed, stopped = _stream(tokenizer, ids, stops)
        pushed_ids = ids[:pushed]
        assert "".join(chunks) == _reference(tokenizer, pushed_ids, stops), (seed, ids, stops)
        full = tokenizer.decode(pushed_ids, skip_special_tokens=True)
        assert stopped == any(s in full for s in stops), (seed, ids, stops)
        if stopped:  # and not a token later than needed (stops in U+FFFD may wait for the next one)
            before = tokenizer.decode(ids[: pushed - 1], skip_special_tokens=True)
            assert not any(s in before for s in stops if "\ufffd" not in s), (seed, ids, stops)
