"""Typed scheduler errors. A module of their own so that both base.py and runner.py can raise them."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import CommandResult


class SchedulerError(Exception):
    """A scheduler command failed. `reason` is the scheduler's own words, fit to show a person."""

    def __init__(self, message: str, *, reason: str = "", result: CommandResult | None = None):
        super().__init__(message)
        self.reason = reason or message
        self.result = result


class SchedulerUnavailable(SchedulerError):
    """The scheduler could not be asked (daemon down, command missing): nothing is known."""


class SubmitRejected(SchedulerError):
    """The scheduler refused the job (bad partition, account, limits...)."""


class CommandTimeout(SchedulerUnavailable):
    """A scheduler command did not finish within its timeout."""
