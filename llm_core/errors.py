"""Errors whose message is meant for the user: what is wrong with their data or settings, and what to do.

The CLI's run summary and the Dagster UI show the message of a `DataError` as the step's cause, and
`next_step` under it; the stack trace stays in the log.
"""

from __future__ import annotations


class DataError(ValueError):
    """The data or the settings cannot give what a stage needs (an empty corpus, no validation text)."""

    def __init__(self, message: str, next_step: str | None = None):
        super().__init__(message)
        self.next_step = next_step

    def __str__(self) -> str:
        return super().__str__() + (f"; next step: {self.next_step}" if self.next_step else "")
