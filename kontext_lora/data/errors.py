"""The data layer's user error, in a module of its own so that every data module can raise it."""

from __future__ import annotations

from kontext_lora.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data a user can fix; the message is one line naming the offending file and the fix."""

    def __init__(self, message: str) -> None:
        # Messages embed paths and decoder reasons that may contain newlines; the contract is one line.
        super().__init__(" ".join(str(message).split()))
