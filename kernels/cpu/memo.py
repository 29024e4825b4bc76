"""Values derived from tensors, kept while those tensors are unchanged (the CPU path's caches)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place write counter of a tensor (inference-mode tensors keep none: 0)."""
    return 0 if tensor.is_inference() else tensor._version


class TensorStamp:
    """Which tensor a kept value was made from, by weak reference (another tensor at a freed one's address is
    not it) and in-place write counter (a reload into it is seen; inference-mode tensors keep none)."""

    __slots__ = ("_ref", "_version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._ref = weakref.ref(tensor)
        self._version = tensor_version(tensor)

    def matches(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is that very tensor, unwritten since."""
        return self._ref() is tensor and self._version == tensor_version(tensor)

    @property
    def alive(self) -> bool:
        return self._ref() is not None


class StepMemo:
    """Small values derived from one step's index tensors (positions, slot mapping, block tables, lengths),
    made on the first layer that needs them and reused by the step's other layers.

    An entry serves only equal contents (one compare per small tensor, about a microsecond): the tensors may be
    buffers rewritten in place between steps (the decode graph runner's), and a freed tensor's address may come
    back with other contents. The last `per_key` entries of a key are kept (a step's layer types may read
    different tables under one key), for the last `keys` keys. Lookups never mutate and an insert rebinds a
    key's tuple in one step, so concurrent engines cannot corrupt it.
    """

    def __init__(self, keys: int = 16, per_key: int = 2) -> None:
        self.keys, self.per_key = keys, per_key
        self._entries: dict[Hashable, tuple[tuple[tuple[torch.Tensor, ...], Any], ...]] = {}  # newest first

    def get(
        self,
        key: Hashable,
        sources: tuple[torch.Tensor, ...],
        make: Callable[[], Any],
        valid: Callable[[Any], bool] | None = None,
    ) -> Any:
        """The value made by `make` for `key` and the contents of `sources` (made now if unknown or not `valid`)."""
        entries = self._entries.get(key, ())
        for saved, value in entries:
            for a, b in zip(saved, sources, strict=True):
                if a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b):  # equal: shapes too
                    break
            else:
                if valid is None or valid(value):
                    return value
        value = make()
        if key not in self._entries and len(self._entries) >= self.keys:
            self._entries.pop(next(iter(self._entries)), None)  # the oldest key
        self._entries[key] = ((tuple(t.clone() for t in sources), value), *entries)[: self.per_key]
        return value


STEP_MEMO = StepMemo()
