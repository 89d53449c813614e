"""The one error type for bad input: it names the field, the value it got and what is allowed.

Core, below the schema and the catalogue, so that every place that checks a value a user typed (a
request field, a `--lora FAMILY=...`, a training `--family`) raises the same type with the same
message, and the gRPC and HTTP layers turn it into INVALID_ARGUMENT / 4xx in one place.
"""

from __future__ import annotations

import enum


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing.MISSING  # RequestError.value when a required field was not given


class RequestError(ValueError):
    """A bad request, naming the field, the value it got and what is allowed (a 4xx, never a 5xx)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        super().__init__(field, value, allowed)  # keeps the error picklable across processes
        self.field = field
        self.value = value
        self.allowed = allowed

    def __str__(self) -> str:
        if self.value is MISSING:
            return f"missing {self.field!r}; allowed: {self.allowed}"
        return f"invalid {self.field!r}: got {_short_repr(self.value)}; allowed: {self.allowed}"


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
