"""The replay buffer: a class-balanced reservoir sample of everything a fleet's model has
learnt from, so a round replays history without holding history in memory.

Each window of history is an item with a stable key (``base:<i>`` for a window of the
registered base data set, ``sample:<id>`` for an uploaded one) and a class. Per class, the
buffer keeps the ``per_class`` items with the smallest priority, where an item's priority
is a hash of its key salted with the buffer's seed. That is reservoir sampling as bottom-k
sampling: after any stream of offers, each item of a class is in the buffer with the same
probability, the buffer never holds more than ``per_class`` keys a class, and the result
does not depend on the order of offers, so a round that runs again (a worker was killed)
builds the same buffer.

A round replays its parent's buffer and, once trained, offers the windows it learnt from
to a copy that becomes its own buffer (stored with the round's version).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field


def priority(key: str, seed: int) -> float:
    """A uniform draw in [0, 1) fixed by ``key`` and ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class ReplayBuffer:
    per_class: int
    seed: int = 0
    # class → [(priority, key)], smallest priority first; at most per_class entries
    items: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    # offers per class, ever (a window offered again after it was evicted counts again)
    seen: dict[str, int] = field(default_factory=dict)
    _index: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def offer(self, key: str, label: str) -> None:
        """Consider window ``key`` of class ``label``. A key held under another class (the
        window was relabelled) leaves that class first: a window is replayed with one
        label, its latest."""
        where = self._where()
        before = where.get(key)
        if before == label:
            return  # offered before: already counted
        if before is not None:
            self.items[before] = [(p, k) for p, k in self.items[before] if k != key]
            del where[key]
        held = self.items.setdefault(label, [])
        self.seen[label] = self.seen.get(label, 0) + 1
        p = priority(key, self.seed)
        if self.per_class <= 0:
            return
        if len(held) < self.per_class:
            held.append((p, key))
        elif p < held[-1][0]:
            where.pop(held[-1][1], None)
            held[-1] = (p, key)
        else:
            return
        where[key] = label
        held.sort()

    def _where(self) -> dict[str, str]:
        """key → the class it is held under (built once, then kept up to date)."""
        if self._index is None:
            self._index = {k: c for c, entries in self.items.items() for _, k in entries}
        return self._index

    def offer_all(self, pairs: Iterable[tuple[str, str]]) -> ReplayBuffer:
        for key, label in pairs:
            self.offer(key, label)
        return self

    def windows(self) -> list[tuple[str, str]]:
        """(key, class) of every window in the buffer, class by class."""
        return [(k, c) for c in sorted(self.items) for _, k in self.items[c]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    def copy(self) -> ReplayBuffer:
        return ReplayBuffer.from_json(self.to_json())

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "per_class": self.per_class,
                "seed": self.seed,
                "seen": self.seen,
                "items": {c: [k for _, k in v] for c, v in sorted(self.items.items())},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReplayBuffer:
        raw = json.loads(data)
        seed = raw["seed"]
        return cls(
            per_class=raw["per_class"],
            seed=seed,
            seen={c: int(n) for c, n in raw["seen"].items()},
            items={c: sorted((priority(k, seed), k) for k in ks) for c, ks in raw["items"].items()},
        )
