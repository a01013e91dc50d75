"""JSON from outside, parsed only once it is known to be small and shallow enough.

``json.loads`` recurses once per level of nesting: ``[`` × 100 000 raises RecursionError
(not ValueError) and, on a thread with a small stack, can crash the process outright. So
bytes from a device, a broker or an offer are measured first, in one pass that never
recurses, and refused with a ValueError subclass (``JsonRefused``) that every caller
already maps to its own named error.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64  # deeper than any message, manifest or metadata file of ours
# A string literal (escapes included; an unterminated one runs to the end, so the scan
# stays linear): removed before the brackets are counted, so a bracket in text never counts.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


class JsonRefused(ValueError):
    """Too large or too deeply nested to parse; ``reason`` is ``oversize`` or ``too_deep``."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings do
    not count). Linear, no recursion; what it says of invalid JSON does not matter, the
    parser refuses that afterwards."""
    bare = np.frombuffer(_STRING.sub(b"", raw), dtype=np.uint8)
    if not len(bare):
        return 0
    return max(0, int(np.cumsum(_STEP[bare], dtype=np.int32).max()))


def check(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> bytes:
    """``raw`` as bytes, or JsonRefused if it is over ``max_bytes`` or nested deeper than
    ``max_depth``."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise JsonRefused(f"{len(data)} bytes of JSON exceed {max_bytes}", reason="oversize")
    found = depth(data)
    if found > max_depth:
        raise JsonRefused(f"JSON nested {found} levels deep exceeds {max_depth}", reason="too_deep")
    return data


def loads_bounded(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` of ``raw`` after ``check``: a ValueError (JsonRefused, or the parser's
    own for invalid JSON) for anything it cannot or may not parse, never a RecursionError."""
    return json.loads(check(raw, max_bytes=max_bytes, max_depth=max_depth))
