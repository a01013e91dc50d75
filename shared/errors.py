"""The exception tree every edgeloop package raises from.

EdgeloopError
├── MessageError        a wire message is malformed, too big or of the wrong schema
├── PackageError        a model package is corrupt, truncated or fails its checks
├── ConfigError         settings are unsafe or inconsistent
├── DataError           a data set or generator was asked for something impossible
└── BudgetError         no compression setting meets a hardware profile's budgets

Each carries a short machine-readable ``reason`` (used for dead-letter counts and
update-status reports) next to the human message.
"""

from __future__ import annotations


class EdgeloopError(Exception):
    """Base of every error edgeloop raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MessageError(EdgeloopError):
    reason = "invalid_message"


class PackageError(EdgeloopError):
    reason = "invalid_package"


class ConfigError(EdgeloopError):
    reason = "invalid_config"


class DataError(EdgeloopError):
    reason = "invalid_data_request"


class BudgetError(EdgeloopError):
    reason = "budget_missed"


class EdgeloopWarning(UserWarning):
    """Warnings of our own; the test suite turns them into errors."""
