"""hpchub's batchspawner: JupyterHub single-user servers as batch jobs.

A successor to the `batchspawner` package with the same import name: the two must not be installed in
the same environment.
"""
from hpchub import api as _status_api  # noqa: F401  (registers /hub/api/hpchub/..., for hpchub-status)

from . import api  # noqa: F401  (registers /hub/api/batchspawner)
from .spawner import BatchSpawner, GridEngineSpawner, LocalBatchSpawner, PBSSpawner, SlurmSpawner

__all__ = ["BatchSpawner", "GridEngineSpawner", "LocalBatchSpawner", "PBSSpawner", "SlurmSpawner"]
