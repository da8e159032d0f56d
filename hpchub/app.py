"""The `hpchub` command: JupyterHub with hpchub's defaults.

With no configuration it runs the embedded default: the local batch system (jobs are local processes
going through the same job template and lifecycle as on a cluster), listening on 127.0.0.1, with a demo
user whose one-time password is printed at start. A `jupyterhub_config.py` (-f) changes anything.
"""
from __future__ import annotations

import asyncio
import os
import sys

from jupyterhub.app import JupyterHub
from traitlets import Unicode, default

from batchspawner import LocalBatchSpawner

from . import __version__
from .demo import DemoAuthenticator
from .reconcile import detach_queued_spawns, reconcile


def _default_data_dir() -> str:
    if os.environ.get("HPCHUB_DATA_DIR"):
        return os.environ["HPCHUB_DATA_DIR"]
    if os.geteuid() == 0:
        return "/var/lib/hpchub"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "hpchub")


class HpcHub(JupyterHub):
    name = "hpchub"
    version = __version__
    description = """Jupyter for HPC clusters: JupyterLab in batch jobs, reached through JupyterHub.

    Without a configuration file, runs the embedded default (local batch system, 127.0.0.1:8000, a demo
    user with a generated password)."""

    data_dir = Unicode(
        help="Directory for the hub's database, cookie secret and pid files "
        "(default: $HPCHUB_DATA_DIR, else /var/lib/hpchub as root, else ~/.local/share/hpchub).",
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return _default_data_dir()

    @default("ip")
    def _default_ip(self) -> str:
        return "127.0.0.1"

    @default("template_paths")
    def _default_template_paths(self) -> list[str]:
        # hpchub's pages extend JupyterHub's (the home page shows the batch jobs' walltime left)
        return [os.path.join(os.path.dirname(__file__), "templates")]

    @default("bind_url")
    def _bind_url_default(self) -> str:
        # the name overrides JupyterHub's own default method, which it also calls to compare against
        return ("https" if self.ssl_cert else "http") + "://127.0.0.1:8000"

    @default("spawner_class")
    def _default_spawner_class(self) -> type:
        return LocalBatchSpawner

    @default("authenticator_class")
    def _default_authenticator_class(self) -> type:
        return DemoAuthenticator

    @default("concurrent_spawn_limit")
    def _default_concurrent_spawn_limit(self) -> int:
        # JupyterHub counts a spawn as pending until its server answers, queue wait included: 100 queued
        # jobs would lock every other user out. BatchSpawner.max_concurrent_submissions bounds the real work.
        return 0

    @default("db_url")
    def _default_db_url(self) -> str:
        return "sqlite:///" + os.path.join(self.data_dir, "jupyterhub.sqlite")

    @default("cookie_secret_file")
    def _default_cookie_secret_file(self) -> str:
        return os.path.join(self.data_dir, "jupyterhub_cookie_secret")

    def load_config_file(self, *args, **kwargs) -> None:
        super().load_config_file(*args, **kwargs)
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        proxy = self.config.ConfigurableHTTPProxy
        if "pid_file" not in proxy:
            proxy.pid_file = os.path.join(self.data_dir, "proxy.pid")
        if "ledger_url" not in self.config.BatchSpawner:
            self.config.BatchSpawner.ledger_url = "sqlite:///" + os.path.join(self.data_dir, "hpchub_ledger.sqlite")
        if "tunnel_host_key_file" not in self.config.BatchSpawner:
            self.config.BatchSpawner.tunnel_host_key_file = os.path.join(self.data_dir, "tunnel_host_key")

    async def init_spawners(self) -> int:
        detach_queued_spawns(self)
        checked = await super().init_spawners()
        # in the background: a resumed spawn waits for its job, and the hub must not wait for that
        self._reconcile = asyncio.ensure_future(reconcile(self))
        return checked

    async def start(self) -> None:
        await super().start()
        if isinstance(self.authenticator, DemoAuthenticator):
            # stdout, not the log: the password is for the person at the terminal, never for log files
            print(
                f"\nhpchub is running at {self.bind_url}\n"
                f"  log in as:  {self.authenticator.demo_user}\n"
                f"  password:   {self.authenticator.password}  (new at every start)\n",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    HpcHub.launch_instance(argv if argv is not None else sys.argv[1:])
