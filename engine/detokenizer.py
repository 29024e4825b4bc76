"""Incremental detokenization and stop-string matching, one `IncrementalDetokenizer` per request.

    detok = IncrementalDetokenizer(tokenizer, params)  # SamplingParams: stop, skip_special_tokens, ...
    for each sampled token:
        delta = detok.add_tokens([token_id])   # text safe to stream now ("" if nothing new is final yet)
        if detok.finished: ...                 # a stop string matched (detok.stop_str): finish_reason "stop"
    delta = detok.flush()                      # when the request ends otherwise (stop token, max_tokens)
    detok.output_text                          # everything returned so far, concatenated

Text is built from each token's bytes (the byte-level BPE alphabet mapped back to bytes) through an
incremental UTF-8 decoder, so a character split across tokens (emoji, CJK) is emitted only once complete,
and the concatenated deltas equal `tokenizer.decode(ids, skip_special_tokens=...)` of the same ids (up to a
stop string). Cost per token is O(1) plus the stop-string checks, which look only at the new text and the
last (longest stop - 1) characters before it: bounded by the number and length of the stop strings, which
SamplingParams caps (16 of 256 characters). The token-bytes table is built once per tokenizer object (about
0.3 s for o200k) and cached.

Stop strings: the text up to the earliest stop string is returned and the request is finished; the stop
string itself is included only with `include_stop_str_in_output`. While streaming, a suffix of the text that
could be the beginning of a stop string is held back until it is ruled out (not needed when the stop string
would be included anyway). A stop string may span any number of tokens.

Special tokens (the tokenizer's added tokens marked special, e.g. harmony `<|return|>`) produce no text when
`skip_special_tokens`; otherwise their literal text.

`token_bytes(tokenizer)` exposes the id -> bytes table (harmony's `HarmonyEncoding.token_bytes` reads it);
`find_stop` / `stop_prefix_len` are the stop-string matching and hold-back, shared with the server's harmony
event stream (which applies stop strings to the final channel's text only).
Tokenizers whose decoder is not byte-level fall back to decoding each token alone (gap: lossy for tokens that
are not whole characters; gpt-oss and the tiny test tokenizer are byte-level).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from functools import lru_cache

from gptoss.engine.sampling_params import SamplingParams
from tokenizers import Tokenizer, decoders


@lru_cache(maxsize=1)
def byte_level_char_to_byte() -> dict[int, int]:
    """GPT-2's byte-level alphabet inverted: ord(char) -> byte (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(chars, printable, strict=True))


_TABLES: dict[int, tuple[Tokenizer, list[bytes], frozenset[int]]] = {}


def _tables(tokenizer: Tokenizer) -> tuple[list[bytes], frozenset[int]]:
    """(id -> bytes table, ids of special tokens), built once per tokenizer object."""
    cached = _TABLES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1], cached[2]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        # str.translate to latin-1 code points, then encode: one C-level pass per token.
        translation = {char: chr(byte) for char, byte in byte_level_char_to_byte().items()}
        for token, token_id in vocab.items():
            if token_id in added:
                table[token_id] = added[token_id].content.encode("utf-8")
            else:
                table[token_id] = token.translate(translation).encode("latin-1")
    else:
        for token_id in vocab.values():
            table[token_id] = tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
    specials = frozenset(token_id for token_id, token in added.items() if token.special)
    _TABLES[id(tokenizer)] = (tokenizer, table, specials)
    return table, specials


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for (special tokens: their literal text), indexed by id."""
    return _tables(tokenizer)[0]


def find_stop(text: str, stops: Iterable[str]) -> tuple[int, str] | None:
    """The earliest (start, stop string) in `text`; ties go to the stop listed first. None: no match."""
    best: tuple[int, str] | None = None
    for stop_str in stops:
        start = text.find(stop_str)
        if start >= 0 and (best is None or start < best[0]):
            best = (start, stop_str)
    return best


def stop_prefix_len(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: what a stream must
    hold back until the next text says whether a stop string begins there.

    Only lengths whose prefix ends with `text`'s last character are compared (found with `str.rfind`): a few
    C-level comparisons per stop string rather than one per possible length.
    """
    longest = 0
    last = text[-1:]
    for stop_str in stops:
        end = min(len(stop_str) - 1, len(text))  # candidate prefix lengths: longest + 1 .. end
        while end > longest:
            end = stop_str.rfind(last, 0, end) + 1  # the longest candidate length whose prefix ends with `last`
            if end <= longest:
                break
            if text.endswith(stop_str[:end]):
                longest = end
                break
            end -= 1
    return longest


class IncrementalDetokenizer:
    """Turns one request's sampled token ids into streamable text deltas; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams | None = None,
        *,
        stop: Iterable[str] | None = None,
        include_stop_str_in_output: bool | None = None,
        skip_special_tokens: bool | None = None,
    ) -> None:
        """Settings come from `params`; keyword arguments override it (defaults: no stops, skip specials)."""
        self._table, specials = _tables(tokenizer)
        self.stop: tuple[str, ...] = tuple(stop if stop is not None else (params.stop if params else ()))
        self.include_stop_str_in_output = (
            include_stop_str_in_output
            if include_stop_str_in_output is not None
            else (params.include_stop_str_in_output if params else False)
        )
        skip = (
            skip_special_tokens if skip_special_tokens is not None else (params.skip_special_tokens if params else True)
        )
        self._skipped_ids = specials if skip else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Holding back only matters when the stop string would be cut out of the output.
        self._hold_back_prefixes = bool(self.stop) and not self.include_stop_str_in_output
        self._pending = ""  # decoded text not yet returned (a possible stop-string prefix)
        self._emitted_tail = ""  # last (max stop length - 1) returned chars, where a stop match may begin
        self._chunks: list[str] = []
        self.finished = False  # no more text will come: a stop string matched, or flush() was called
        self.stop_str: str | None = None  # the stop string that matched, if one did
        self.num_tokens = 0

    @property
    def output_text(self) -> str:
        """All text returned so far by `add_tokens` / `flush`."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append sampled tokens; return the newly final text (possibly ""). No-op once `finished`."""
        if self.finished:
            return ""
        token_ids = list(token_ids)
        self.num_tokens += len(token_ids)
        table, skipped = self._table, self._skipped_ids
        # Ids past the tokenizer's table (a model vocabulary padded beyond it) decode to nothing.
        data = b"".join(table[t] for t in token_ids if t not in skipped and t < len(table))
        if data:
            self._pending += self._utf8.decode(data, final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended without a stop string: return all held-back text (partial UTF-8 -> U+FFFD)."""
        if self.finished:
            return ""
        self._pending += self._utf8.decode(b"", final=True)
        delta = self._release(final=True)
        self.finished = True
        return delta

    def _release(self, final: bool) -> str:
        """Match stop strings in the tail + pending text, hold back a possible stop prefix, emit the rest."""
        if not self._pending:
            return ""
        if self.stop:
            window = self._emitted_tail + self._pending
            match = find_stop(window, self.stop)
            if match is not None:
                start, stop_str = match
                end = start + len(stop_str) if self.include_stop_str_in_output else start
                self.finished = True
                self.stop_str = stop_str
                return self._emit(window[len(self._emitted_tail) : max(end, len(self._emitted_tail))], "")
        keep = 0 if final or not self._hold_back_prefixes else stop_prefix_len(self._pending, self.stop)
        cut = len(self._pending) - keep
        return self._emit(self._pending[:cut], self._pending[cut:])

    def _emit(self, delta: str, pending: str) -> str:
        self._pending = pending
        if delta:
            self._chunks.append(delta)
            if self._max_stop_len > 1:
                self._emitted_tail = (self._emitted_tail + delta)[-(self._max_stop_len - 1) :]
        return delta
