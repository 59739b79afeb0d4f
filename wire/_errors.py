"""The one exception that wire/ raises."""

from __future__ import annotations


class WireError(ValueError):
    """Malformed, oversized, unknown-version or otherwise invalid wire input.

    ``hint`` is a short machine-readable code that an adapter may send back to a peer
    (for example ``"too_large"`` or ``"bad_version"``); the message is for humans and logs.
    """

    def __init__(self, message: str, *, hint: str = "bad_message") -> None:
        super().__init__(message)
        self.hint = hint
