"""Scheduler adapters (Slurm, Grid Engine, PBS, the embedded localq) and the runners that execute their commands."""
from __future__ import annotations

from .base import (Adapter, Associations, CommandTimeout, InvalidRequest, JobRequest, JobState, JobStatus,
                   PartitionInfo, QueuePosition, SchedulerError, SchedulerUnavailable, SubmitRejected)
from .local import LocalAdapter
from .pbs import PBSAdapter
from .runner import CommandResult, LocalRunner, Runner, SudoRunner
from .sge import SGEAdapter
from .slurm import SlurmAdapter

__all__ = [
    "Adapter", "Associations", "CommandResult", "CommandTimeout", "InvalidRequest", "JobRequest", "JobState", "JobStatus",
    "LocalAdapter", "LocalRunner", "PBSAdapter", "PartitionInfo", "QueuePosition", "Runner", "SchedulerError", "SchedulerUnavailable", "SGEAdapter",
    "SlurmAdapter", "SSHRunner", "SubmitRejected", "SudoRunner", "get_adapter",
]

_ADAPTERS: dict[str, type[Adapter]] = {
    "slurm": SlurmAdapter, "sge": SGEAdapter, "pbs": PBSAdapter, "local": LocalAdapter,
}


def __getattr__(name: str):
    if name == "SSHRunner":  # asyncssh takes ~150 ms to import: only for those who use it
        from .ssh import SSHRunner

        return SSHRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered under `name`."""
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(sorted(_ADAPTERS))}") from None
