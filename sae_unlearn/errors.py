"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment. The CLI prints the message on one line and exits 2."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.fix = fix
        text = message if fix is None else f"{message} ({fix})"
        super().__init__(text.replace("\n", " "))
