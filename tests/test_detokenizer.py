"""IncrementalDetokenizer: deltas join to the full decode; partial UTF-8 held back; stops across tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from gptoss.engine.detokenizer import IncrementalDetokenizer, stop_prefix_len, token_bytes
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.tokenizer import build_tiny_tokenizer, load_tokenizer
from tokenizers import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, 日本語のテキスト, русский, العربية, emoji 🙂🦀👨‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "中文字符和表情符号混合：😀😃😄 — end\n\n  indented\tcode()",
]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def real_tokenizer(shared_dir: Path) -> Tokenizer:
    return load_tokenizer(shared_dir / "vocab" / "o200k_harmony.tokenizer.json")


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int] | None = None) -> list[str]:
    """Feed ids in chunks (1 token at a time by default); return every delta including the flush."""
    deltas = []
    position = 0
    sizes = iter(chunk_sizes or [])
    while position < len(ids) and not detok.finished:
        size = next(sizes, 1)
        deltas.append(detok.add_tokens(ids[position : position + size]))
        position += size
    deltas.append(detok.flush())
    return deltas


def check_round_trip(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    special = "<|return|>"
    for text in [*TEXTS, f"<|start|>assistant<|message|>{TEXTS[1]}{special}"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        for skip in (True, False):
            for chunks in (None, [rng.randint(1, 4) for _ in ids]):
                detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
                deltas = stream(detok, ids, chunks)
                assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
                assert detok.output_text == "".join(deltas)
                # A delta never ends in a replacement character: partial characters are held back.
                assert not any(d.endswith("\ufffd") for d in deltas)
                assert detok.num_tokens == len(ids)


def test_round_trip_tiny(tiny_tokenizer: Tokenizer) -> None:
    check_round_trip(tiny_tokenizer)


def test_round_trip_real(real_tokenizer: Tokenizer) -> None:
    check_round_trip(real_tokenizer)


def test_token_bytes_real(real_tokenizer: Tokenizer) -> None:
    table = token_bytes(real_tokenizer)
    assert len(table) == 201088
    assert table[real_tokenizer.token_to_id("<|return|>")] == b"<|return|>"
    for token_id in random.Random(1).sample(range(199998), 2000):
        try:
            text = table[token_id].decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character: only meaningful joined to its neighbours
        assert text == real_tokenizer.decode([token_id])


def test_partial_characters_are_held_back(tiny_tokenizer: Tokenizer) -> None:
    # "🦀" is not in the tiny tokenizer's training text: its 4 UTF-8 bytes span several tokens.
    ids = tiny_tokenizer.encode("🦀", add_special_tokens=False).ids
    assert len(ids) >= 2
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert [detok.add_tokens([i]) for i in ids] == [""] * (len(ids) - 1) + ["🦀"]
    # An incomplete character at the end is flushed as U+FFFD, like tokenizer.decode.
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add_tokens(ids[:2]) == ""
    assert detok.flush() == tiny_tokenizer.decode(ids[:2]) == "\ufffd"


def ids_of(tokenizer: Tokenizer, pieces: list[str]) -> list[int]:
    """Token ids whose decode is "".join(pieces), with token boundaries at least at the piece boundaries."""
    return [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False).ids]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(tiny_tokenizer: Tokenizer, include: bool) -> None:
    ids = ids_of(tiny_tokenizer, ["The answer", " is 4", "2.\n", "\nSTO", "P", " more text"])
    params = SamplingParams(stop=["\n\nSTOP"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tiny_tokenizer, params)
    deltas = stream(detok, ids)
    expected = "The answer is 42." + ("\n\nSTOP" if include else "")
    assert "".join(deltas) == expected
    assert detok.finished and detok.stop_str == "\n\nSTOP"
    assert detok.add_tokens(ids[:3]) == "" and detok.flush() == ""


def test_stop_prefix_held_back_then_released(tiny_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=["abc"])
    assert detok.add_tokens(ids_of(tiny_tokenizer, ["xa"])) == "x"  # "a" might start "abc"
    assert detok.add_tokens(ids_of(tiny_tokenizer, ["b"])) == ""  # "ab" might too
    assert detok.add_tokens(ids_of(tiny_tokenizer, ["d"])) == "abd"  # ruled out
    assert detok.add_tokens(ids_of(tiny_tokenizer, ["ab"])) == ""
    assert detok.flush() == "ab"  # the request ended otherwise: release the held text
    assert detok.output_text == "xabdab" and detok.stop_str is None


def test_stop_inside_one_token_and_earliest_wins(tiny_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=["world", "Hello,"])
    # Both stops are in the first chunk; "Hello," starts first.
    assert detok.add_tokens(ids_of(tiny_tokenizer, ["Say Hello, world! more"])) == "Say "
    assert detok.stop_str == "Hello,"
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=["lazy"], include_stop_str_in_output=True)
    deltas = stream(detok, ids_of(tiny_tokenizer, ["over the lazy dog"]), [100])
    assert "".join(deltas) == "over the lazy"


def test_non_ascii_stop_split_mid_character(real_tokenizer: Tokenizer) -> None:
    text = "答案是四十二。🙂停止这里的文字"
    ids = real_tokenizer.encode(text, add_special_tokens=False).ids
    for stop, include in (("🙂停", False), ("🙂停", True), ("。", False)):
        detok = IncrementalDetokenizer(real_tokenizer, SamplingParams(stop=[stop], include_stop_str_in_output=include))
        joined = "".join(stream(detok, ids))
        cut = text.index(stop) + (len(stop) if include else 0)
        assert joined == text[:cut]


def test_special_tokens_and_params(tiny_tokenizer: Tokenizer) -> None:
    ids = ids_of(tiny_tokenizer, ["<|channel|>", "final", "<|message|>", "Hi", "<|return|>"])
    shown = IncrementalDetokenizer(tiny_tokenizer, SamplingParams(skip_special_tokens=False))
    assert "".join(stream(shown, ids)) == "<|channel|>final<|message|>Hi<|return|>"
    skipped = IncrementalDetokenizer(tiny_tokenizer, SamplingParams())
    assert "".join(stream(skipped, ids)) == "finalHi"
    # A stop string matches the text of special tokens only when they are shown.
    stopped = IncrementalDetokenizer(tiny_tokenizer, stop=["<|message|>"], skip_special_tokens=False)
    assert "".join(stream(stopped, ids)) == "<|channel|>final"


def test_random_stop_strings_match_reference(tiny_tokenizer: Tokenizer) -> None:
    """Against a plain reference: full text cut at the earliest stop, streamed one token at a time."""
    rng = random.Random(7)
    text = TEXTS[0] + " " + TEXTS[1]
    ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
    full = tiny_tokenizer.decode(ids)
    for _ in range(40):
        start = rng.randrange(len(full) - 6)
        stops = [full[start : start + rng.randint(1, 6)], "zzz" + full[start : start + 2]]
        include = rng.random() < 0.5
        detok = IncrementalDetokenizer(tiny_tokenizer, stop=stops, include_stop_str_in_output=include)
        joined = "".join(stream(detok, ids))
        first = min((full.find(s), s) for s in stops if s in full)
        expected = full[: first[0] + (len(first[1]) if include else 0)]
        assert joined == expected, (stops, include)


def brute_force_stop_prefix_len(stops: tuple[str, ...], text: str) -> int:
    """The longest suffix of `text` that is a proper prefix of a stop string, by trying every length."""
    return max(
        (n for stop in stops for n in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:n])),
        default=0,
    )


def test_stop_prefix_search_matches_brute_force() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randrange(1, 9))) for _ in range(rng.randrange(1, 4)))
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 12)))
        assert stop_prefix_len(text, stops) == brute_force_stop_prefix_len(stops, text), (stops, text)


def test_largest_allowed_stop_lists_cost_little_per_token(tiny_tokenizer: Tokenizer) -> None:
    """16 stop strings of 256 characters built to nearly match the text at every length (the worst case of
    the prefix search): 2,000 one-token steps stay far below a second (measured ~0.1 s)."""
    import time

    from gptoss.engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    stops = ["a" * (MAX_STOP_STRING_CHARS - 1 - i) + "b" for i in range(MAX_STOP_STRINGS)]
    detok = IncrementalDetokenizer(tiny_tokenizer, SamplingParams(stop=stops))
    token = tiny_tokenizer.encode("a", add_special_tokens=False).ids
    start = time.perf_counter()
    for _ in range(2000):
        detok.add_tokens(token)
    elapsed = time.perf_counter() - start
    assert not detok.finished and len(detok.output_text) > 1000
    assert elapsed < 1.0, f"{elapsed:.2f} s for 2,000 tokens"
