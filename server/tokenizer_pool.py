"""Tokenizing large texts in worker processes, so that the event loop keeps the GIL.

Preparation already runs on a thread pool (server/serving.py `off_loop`), but `tokenizers` holds the GIL
while it encodes: a 1 MB prompt tokenized on a worker thread still kept the event loop waiting for the GIL
for 1-2 s (`/health` included). Texts of at least `MIN_POOLED_CHARS` characters are therefore encoded by a
few worker processes (`python -m gptoss.server.tokenizer_pool`, started on first use, each with its own copy
of the tokenizer; requests and answers are pickles over its stdin/stdout), and only the token ids come back.
`PooledHarmonyEncoding` is the server's `HarmonyEncoding` with that one change; the ids are exactly the
in-process ones (the same tokenizer, the same harmony rules).

The workers are plain subprocesses rather than a `multiprocessing` pool: a spawned pool re-imports the
parent's `__main__`, which re-runs any script that builds and serves an app without a `__main__` guard.
"""

from __future__ import annotations

import pickle
import queue
import subprocess
import sys
import threading
from typing import Any, BinaryIO

from gptoss.engine.harmony.render import HarmonyEncoding
from tokenizers import Tokenizer

MIN_POOLED_CHARS = 32_768  # below this an encode takes a few ms: not worth a round trip
POOL_PROCESSES = 2


class TokenizerWorker:
    """One worker process; one request at a time (the pool hands each worker to one caller)."""

    def __init__(self, tokenizer_json: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gptoss.server.tokenizer_pool"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._send(tokenizer_json)

    def _send(self, item: Any) -> None:
        assert self.process.stdin is not None
        pickle.dump(item, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.process.stdin.flush()

    def encode(self, kind: str, text: str) -> list[int]:
        """`kind` "text" (harmony ordinary text) or "raw" (special-token spellings are special tokens)."""
        assert self.process.stdout is not None
        self._send((kind, text))
        ok, value = pickle.load(self.process.stdout)  # the wait releases the GIL; unpickling ids is quick
        if not ok:
            raise RuntimeError(f"tokenizer worker: {value}")
        return value

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class PooledHarmonyEncoding(HarmonyEncoding):
    """`HarmonyEncoding` whose large texts are encoded in worker processes (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, min_pooled_chars: int = MIN_POOLED_CHARS) -> None:
        super().__init__(tokenizer)
        self.min_pooled_chars = min_pooled_chars
        # Serialised once, now (0.6 s for o200k, holding the GIL): not while a request waits for a worker.
        self._tokenizer_json = tokenizer.to_str()
        self._idle: queue.Queue[TokenizerWorker] = queue.Queue()
        self._started = 0
        self._lock = threading.Lock()

    def _encode_pooled(self, kind: str, text: str) -> list[int]:
        with self._lock:
            start_one = self._idle.empty() and self._started < POOL_PROCESSES
            if start_one:
                self._started += 1
        worker = TokenizerWorker(self._tokenizer_json) if start_one else self._idle.get()
        try:
            ids = worker.encode(kind, text)
        except (OSError, EOFError, pickle.UnpicklingError):
            worker.close()  # a dead worker is replaced by the next call
            with self._lock:
                self._started -= 1
            raise
        self._idle.put(worker)
        return ids

    def encode_text(self, text: str) -> list[int]:
        if len(text) < self.min_pooled_chars:
            return super().encode_text(text)
        return self._encode_pooled("text", text)

    def encode_raw(self, text: str) -> list[int]:
        """Raw text (special-token spellings are the special tokens) -> token ids."""
        if len(text) < self.min_pooled_chars:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._encode_pooled("raw", text)

    def shutdown(self) -> None:
        while not self._idle.empty():
            self._idle.get().close()


def serve_worker(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The worker's loop: the tokenizer's JSON first, then (kind, text) -> (ok, ids or error) until EOF."""
    encoding = HarmonyEncoding(Tokenizer.from_str(pickle.load(stdin)))
    while True:
        try:
            kind, text = pickle.load(stdin)
        except EOFError:
            return
        try:
            if kind == "text":
                answer: tuple[bool, Any] = (True, encoding.encode_text(text))
            else:
                answer = (True, encoding.tokenizer.encode(text, add_special_tokens=False).ids)
        except Exception as exc:  # reported to the caller, the worker goes on
            answer = (False, f"{type(exc).__name__}: {exc}")
        pickle.dump(answer, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    serve_worker(sys.stdin.buffer, sys.stdout.buffer)
