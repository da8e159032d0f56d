"""The `hpchub` command: JupyterHub with hpchub's defaults.

With no configuration it runs the embedded default: the local batch system (jobs are local processes
going through the same job template and lifecycle as on a cluster), listening on 127.0.0.1, with a demo
user whose one-time password is printed at start. `-f hpchub.toml` loads the admin's TOML file
(hpchub.config), then a `jupyterhub_config.py` beside it or given with --jupyterhub-config; `-f` with a
`.py` file loads that alone, as `jupyterhub` does. `--check-config FILE` checks a TOML file and exits;
`--generate-config` writes a commented example.
"""
from __future__ import annotations

import asyncio
import os
import sys

from jupyterhub.app import JupyterHub
from jupyterhub.app import aliases as hub_aliases
from traitlets import Dict, Integer, Unicode, default
from traitlets.config import catch_config_error

from batchspawner import LocalBatchSpawner
from batchspawner.profiles import ConfigError

from . import __version__
from .config import check, example_text, load
from .culling import SERVICE_NAME as CULLER, culler_role, culler_service
from .demo import DemoAuthenticator
from .reconcile import detach_queued_spawns, reconcile

EXAMPLE_FILE = "hpchub.toml"


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

    aliases = Dict({**hub_aliases, "check-config": "HpcHub.check_config",
                    "jupyterhub-config": "HpcHub.jupyterhub_config"})

    check_config = Unicode(
        "",
        help="Check this hpchub TOML file (every key, the clusters and profiles together, the files it names) "
        "and exit: 0 with a summary when it is valid, 1 with every problem otherwise. Starts nothing.",
    ).tag(config=True)

    jupyterhub_config = Unicode(
        "",
        help="A jupyterhub_config.py loaded after the TOML file given with -f, for settings the TOML file "
        "does not cover (it wins where both set something). Default: jupyterhub_config.py beside the TOML "
        "file, when there is one.",
    ).tag(config=True)

    data_dir = Unicode(
        help="Directory for the hub's database, cookie secret and pid files "
        "(default: $HPCHUB_DATA_DIR, else /var/lib/hpchub as root, else ~/.local/share/hpchub).",
    ).tag(config=True)

    cull_idle_timeout = Integer(
        3600,
        min=0,
        help="Stop a server whose user has been inactive this many seconds (its batch job is cancelled, "
        "freeing the node). Pending servers are never culled; a busy kernel counts as activity. 0: no idle "
        "culling. Runs jupyterhub-idle-culler as a hub-managed service.",
    ).tag(config=True)

    cull_every = Integer(300, min=1, help="Seconds between two passes of the idle culler.").tag(config=True)

    cull_max_age = Integer(
        0,
        min=0,
        help="Stop servers older than this many seconds even if active (0: no maximum age); the scheduler's "
        "walltime limits them anyway.",
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

    @default("cleanup_servers")
    def _default_cleanup_servers(self) -> bool:
        # batch jobs outlive the hub: a stop or restart of the service must not cancel every user's job
        # (a restarted hub takes them back). The embedded default's local jobs go with the hub.
        spawner = self.spawner_class
        return isinstance(spawner, type) and issubclass(spawner, LocalBatchSpawner)

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

    @catch_config_error
    def parse_command_line(self, argv: list[str] | None = None) -> None:
        super().parse_command_line(argv)
        if self.check_config:
            status, report = check(self.check_config, jupyterhub_config=self.jupyterhub_config or None)
            print(report, file=sys.stdout if status == 0 else sys.stderr, flush=True)
            sys.exit(status)

    def write_config_file(self) -> None:
        """--generate-config: the commented example TOML, to -f FILE.toml or ./hpchub.toml; never over an
        existing file unless -y."""
        path = self.config_file if self.config_file.endswith(".toml") else EXAMPLE_FILE
        if os.path.exists(path) and not self.answer_yes:
            print(f"ERROR: {path} exists; use -y to overwrite it", file=sys.stderr, flush=True)
            sys.exit(1)
        with open(path, "w") as f:
            f.write(example_text())
        print(f"Wrote an example configuration to {path}: edit it, then check it with "
              f"`hpchub --check-config {path}`", flush=True)

    def load_config_file(self, filename: str, path: str | None = None) -> None:
        if filename.endswith(".toml"):
            self._load_toml(filename)
        else:
            super().load_config_file(filename, path)
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        proxy = self.config.ConfigurableHTTPProxy
        if "pid_file" not in proxy:
            proxy.pid_file = os.path.join(self.data_dir, "proxy.pid")
        if "ledger_url" not in self.config.BatchSpawner:
            self.config.BatchSpawner.ledger_url = "sqlite:///" + os.path.join(self.data_dir, "hpchub_ledger.sqlite")
        if "tunnel_host_key_file" not in self.config.BatchSpawner:
            self.config.BatchSpawner.tunnel_host_key_file = os.path.join(self.data_dir, "tunnel_host_key")
        self._add_idle_culler()

    def _add_idle_culler(self) -> None:
        if not self.cull_idle_timeout or any(s.get("name") == CULLER for s in self.services):
            return
        self.services = [*self.services, culler_service(timeout=self.cull_idle_timeout, every=self.cull_every,
                                                        max_age=self.cull_max_age)]
        self.load_roles = [*self.load_roles, culler_role()]

    def _load_toml(self, filename: str) -> None:
        """The TOML file, then the jupyterhub_config.py that goes with it; the command line wins over both."""
        try:
            settings = load(filename, jupyterhub_config=self.jupyterhub_config or None)
        except ConfigError as err:
            print(f"{err}\nhpchub did not start: fix the configuration (check it with "
                  f"`hpchub --check-config {filename}`).", file=sys.stderr, flush=True)
            sys.exit(1)
        self.update_config(settings.config)
        if self.jupyterhub_config and settings.beside is None:
            print(f"ERROR: --jupyterhub-config: no such file {self.jupyterhub_config}", file=sys.stderr, flush=True)
            sys.exit(1)
        if settings.beside:
            self.log.info("Loading %s after %s", settings.beside, filename)
            super().load_config_file(settings.beside)
        else:
            self.update_config(self.cli_config)

    async def init_spawners(self) -> int:
        detach_queued_spawns(self)
        checked = await super().init_spawners()
        # in the background: a resumed spawn waits for its job, and the hub must not wait for that
        self._reconcile = asyncio.ensure_future(reconcile(self))
        return checked

    async def start(self) -> None:
        await super().start()
        if self.generate_config or self.generate_certs or self.subapp:
            return  # JupyterHub did that and stopped: no hub is running
        if isinstance(self.authenticator, DemoAuthenticator):
            # stdout, not the log: the password is for the person at the terminal, never for log files
            print(
                f"\nhpchub is running at {self.bind_url}\n"
                f"  log in as:  {self.authenticator.demo_user}\n"
                f"  password:   {self.authenticator.password}  (new at every start)\n",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["doctor"]:     # `hpchub doctor ...`: checks, nothing started
        from .doctor import main as doctor

        sys.exit(doctor(args[1:]))
    HpcHub.launch_instance(args)
