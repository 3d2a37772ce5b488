"""An append-only record that stays in bounded memory however long a run lasts.

A Remus save helper lives as long as its protection, for months at up to 40
checkpoints a second, and each checkpoint adds a few callback frames and
perhaps log lines: a plain list of them is a leak. What is worth keeping
of such a record is how it began, what led up to now, and the first few
noteworthy items in between (a helper's first error, which is the one a
failure report names even when thousands of lines followed it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import TypeVar, overload

T = TypeVar("T")


class Retained(Sequence[T]):
    """The first ``head`` items, up to ``pinned`` later ones for which ``pin`` is
    true, and the last ``tail``, in arrival order.

    ``total`` counts every item ever appended; ``dropped`` those no longer
    kept. Compares equal to any sequence with the same kept items, so a short
    run (nothing dropped) reads exactly like the list it replaces.
    """

    __slots__ = ("_head", "_head_max", "_pin", "_pinned", "_pinned_max", "_tail", "total")

    def __init__(
        self,
        *,
        head: int,
        tail: int,
        pinned: int = 0,
        pin: Callable[[T], bool] | None = None,
        items: Iterable[T] = (),
    ) -> None:
        if head < 0 or tail < 0 or pinned < 0:
            raise ValueError("head, tail and pinned must be >= 0")
        self._head: list[T] = []
        self._head_max = head
        self._pinned: list[T] = []
        self._pinned_max = pinned if pin is not None else 0
        self._pin = pin
        self._tail: deque[T] = deque(maxlen=tail)
        self.total = 0
        for item in items:
            self.append(item)

    def append(self, item: T) -> None:
        self.total += 1
        if len(self._head) < self._head_max:
            self._head.append(item)
            return
        tail = self._tail
        maxlen = tail.maxlen
        # an item about to fall off the tail (or one with no tail to sit in)
        # is kept only if it is one of the first pinned ones
        leaving = item if maxlen == 0 else tail[0] if len(tail) == maxlen else None
        if (
            leaving is not None
            and self._pin is not None
            and len(self._pinned) < self._pinned_max
            and self._pin(leaving)
        ):
            self._pinned.append(leaving)
        if maxlen:
            tail.append(item)

    @property
    def dropped(self) -> int:
        return self.total - len(self)

    def __len__(self) -> int:
        return len(self._head) + len(self._pinned) + len(self._tail)

    def __iter__(self) -> Iterator[T]:
        return chain(self._head, self._pinned, self._tail)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return list(self)[index]
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError("Retained index out of range")
        for part in (self._head, self._pinned, self._tail):
            if i < len(part):
                return part[i]
            i -= len(part)
        raise AssertionError("unreachable: i < len(self)")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Retained | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the list it replaces

    def __repr__(self) -> str:
        dropped = f", {self.dropped} dropped" if self.dropped else ""
        return f"Retained({list(self)!r}{dropped})"
