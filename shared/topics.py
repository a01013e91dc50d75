"""MQTT topic names: ``edgeloop/v1/{fleet}/{device}/{kind}``, built and parsed in one place."""

from __future__ import annotations

import re
from typing import Literal, get_args

from shared.errors import MessageError

TOPIC_ROOT = "edgeloop/v1"
Kind = Literal["samples", "labels", "heartbeat", "acks", "updates", "update-status"]
KINDS: tuple[str, ...] = get_args(Kind)
# Device → cloud kinds; the cloud → device ones are `acks` and `updates`.
UPLINK_KINDS = ("samples", "labels", "heartbeat", "update-status")

# MQTT wildcards and separators must never appear inside a name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise MessageError(
            f"{what} {value!r} is not a valid name: use 1-64 letters, digits, '.', '_' or '-'",
            reason=f"bad_{what}",
        )
    return value


def topic(fleet: str, device: str, kind: Kind) -> str:
    check_name(fleet, "fleet")
    check_name(device, "device")
    if kind not in KINDS:
        raise MessageError(
            f"unknown topic kind {kind!r}; expected one of {KINDS}", reason="bad_kind"
        )
    return f"{TOPIC_ROOT}/{fleet}/{device}/{kind}"


def subscription(kind: Kind, *, fleet: str = "+", shared_group: str | None = None) -> str:
    """A wildcard subscription over every device of ``fleet`` (or of every fleet)."""
    base = f"{TOPIC_ROOT}/{fleet}/+/{kind}"
    return f"$share/{shared_group}/{base}" if shared_group else base


def parse_topic(value: str) -> tuple[str, str, str]:
    """``(fleet, device, kind)`` of a topic, or MessageError naming what is wrong."""
    parts = value.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise MessageError(
            f"topic {value!r} is not under {TOPIC_ROOT}/{{fleet}}/{{device}}/{{kind}}",
            reason="bad_topic",
        )
    fleet, device, kind = parts[2], parts[3], parts[4]
    check_name(fleet, "fleet")
    check_name(device, "device")
    if kind not in KINDS:
        raise MessageError(f"unknown topic kind {kind!r}", reason="bad_kind")
    return fleet, device, kind
