"""After a hub restart: take back the servers whose jobs were still queued, and cancel jobs no server owns.

JupyterHub itself re-checks only servers that had started (it polls them, and our poll is one batched
query for all); a server whose job was waiting in the queue has state but no server yet, and upstream
batchspawner forgot it. Here its spawn is resumed (the spawner adopts the queued job) and routed when it
starts. A ledger job that belongs to no server's state is an orphan: cancelled and recorded as such.
"""
from __future__ import annotations

import asyncio
import logging

from jupyterhub import orm

from batchspawner import BatchSpawner

from .engines import parse_engine_tag

log = logging.getLogger(__name__)


def detach_queued_spawns(app) -> None:
    """Before JupyterHub checks the servers it believes started: a spawn whose job was still queued when the
    hub stopped has a server row but no port yet. JupyterHub would poll it, find nothing listening and
    stop it (cancelling the job); instead it is set aside here and resumed by `reconcile`."""
    for orm_spawner in app.db.query(orm.Spawner).filter(orm.Spawner.server != None):  # noqa: E711 (SQL)
        state = orm_spawner.state or {}
        if state.get("job_id") and not state.get("job_port"):
            app.db.delete(orm_spawner.server)
            orm_spawner.server = None
    app.db.commit()


async def reconcile(app) -> None:
    """Resume queued spawns and cancel orphans; `app` is the running JupyterHub application."""
    owned: set[str] = set()
    for orm_spawner in app.db.query(orm.Spawner).filter(orm.Spawner.state != None):  # noqa: E711 (SQL)
        tag = (orm_spawner.state or {}).get("job_tag")
        if not tag:
            continue
        owned.add(tag)
        if orm_spawner.server is None:
            user = app.users[orm_spawner.user]
            if isinstance(user.spawners[orm_spawner.name], BatchSpawner):
                _resume(app, user, orm_spawner.name)
    await _cancel_orphans(app, owned)


def _resume(app, user, name: str) -> None:
    spawner = user.spawners[name]
    spawner.keep_queued_job()
    spawner._spawn_pending = True  # the pending page and progress API see the spawn at once

    async def finish() -> None:
        try:
            await user.spawn(name)
            await app.proxy.add_user(user, name)
        except Exception:
            log.exception("Could not resume %s's queued server after the hub restart", spawner._log_name)
            return
        finally:
            spawner._spawn_pending = False
        spawner.add_poll_callback(_stopped, app, user, name)
        spawner.start_polling()
        log.info("Resumed %s: its queued job %s started after the hub restart", spawner._log_name, spawner.job_id)

    spawner._spawn_future = asyncio.ensure_future(finish())


async def _stopped(app, user, name: str) -> None:
    await app.proxy.delete_user(user, name)
    await user.stop(name)


async def _cancel_orphans(app, owned: set[str]) -> None:
    ledger = _hub_ledger(app)
    if ledger is None:
        return
    for record in await ledger.active():
        engine = parse_engine_tag(record.tag)   # an ipyparallel engine belongs to its server's job
        if record.tag in owned or (engine is not None and engine.parent in owned) or not record.job_id:
            continue
        user = app.users.get(record.user)
        owner = user.spawners[record.server_name] if user and record.server_name in user.orm_spawners else None
        if not isinstance(owner, BatchSpawner):
            log.warning("Orphan job %s of %s: no server of that user to cancel it as", record.job_id, record.user)
            continue
        await owner.cancel_orphan(record.job_id, record.tag)


def _hub_ledger(app):
    """The ledger is hub-wide configuration: the first batch spawner names it (spawners are made one by one,
    only until one is found, not for every user)."""
    for orm_spawner in app.db.query(orm.Spawner):
        spawner = app.users[orm_spawner.user].spawners[orm_spawner.name]
        if isinstance(spawner, BatchSpawner):
            return spawner.ledger
    return None
