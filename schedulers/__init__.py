"""Scheduler adapters (Slurm, the embedded localq) and the runners that execute their commands."""
from __future__ import annotations

from .base import (Adapter, CommandTimeout, InvalidRequest, JobRequest, JobState, JobStatus, SchedulerError,
                   SchedulerUnavailable, SubmitRejected)
from .local import LocalAdapter
from .runner import CommandResult, LocalRunner, Runner, SudoRunner
from .slurm import SlurmAdapter

__all__ = [
    "Adapter", "CommandResult", "CommandTimeout", "InvalidRequest", "JobRequest", "JobState", "JobStatus",
    "LocalAdapter", "LocalRunner", "Runner", "SchedulerError", "SchedulerUnavailable", "SlurmAdapter", "SubmitRejected",
    "SudoRunner", "get_adapter",
]

_ADAPTERS: dict[str, type[Adapter]] = {"slurm": SlurmAdapter, "local": LocalAdapter}


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered under `name`."""
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(sorted(_ADAPTERS))}") from None
