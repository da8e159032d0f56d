"""BatchSpawner: a JupyterHub Spawner that runs the single-user server as a batch job.

It knows no scheduler syntax. It builds a scheduler-neutral `JobRequest`, renders the adapter's job
template, submits through the adapter and follows the job until its server is reachable: in `direct` mode
when the server reports its port on the node, in `reverse` mode when the job's tunnel to the hub's gateway
is up (batchspawner.tunnelling).
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import socket
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, TypeVar
from urllib.parse import urlsplit

from jupyterhub.spawner import SpawnException, Spawner
from tornado import web
from traitlets import Dict, Enum, Float, Integer, List, Unicode, default, validate

from hpchub.engines import cancel_engines
from hpchub.ldap import auth_state_hook
from hpchub.ledger import Ledger, shared_ledger
from job_templates import TemplateValueError, render_env_file, render_job_script
from schedulers import (
    Adapter,
    InvalidRequest,
    JobRequest,
    JobState,
    JobStatus,
    LocalRunner,
    Runner,
    SchedulerError,
    SubmitRejected,
    SudoRunner,
    get_adapter,
)
from schedulers.base import Associations, PartitionInfo
from schedulers.limits import PartitionCache
from tunnel.gateway import TunnelEvent

from .form import Choice, FormError, options_from_form, profile_for, render_form, validate_options, visible_profiles
from .poller import JobPoller, shared_poller
from .profiles import Catalog, ClusterSpec, ConfigError, parse_catalog
from .request import parse_memory_mb, parse_walltime_s
from .tunnelling import GatewaySettings, HubGateway, shared_gateway

RUNNERS = {"local": LocalRunner, "sudo": SudoRunner}
# the job's environment file carries the tunnel credential to the tunnel client in these variables
TUNNEL_KEY_VAR = "HPCHUB_TUNNEL_KEY"
TUNNEL_KNOWN_HOSTS_VAR = "HPCHUB_TUNNEL_KNOWN_HOSTS"
T = TypeVar("T")


class BatchSpawner(Spawner):
    """Runs `jupyterhub-singleuser` in a batch job. Subclasses choose the scheduler."""

    scheduler = Unicode(
        "slurm",
        help="Scheduler adapter that submits, queries and cancels the jobs: slurm, sge, pbs or local.",
    ).tag(config=True)

    @validate("scheduler")
    def _validate_scheduler(self, proposal: dict) -> str:
        get_adapter(proposal["value"])  # ValueError naming the allowed schedulers
        return proposal["value"]

    runner = Unicode(
        "auto",
        help="""How scheduler commands run: 'sudo' runs them as the user (`sudo -n -u USER --`, without
        passing the hub's environment), 'local' as the hub's own user. 'auto' picks 'sudo' when the hub
        runs as root (jobs must never run as root) and 'local' otherwise.""",
    ).tag(config=True)

    @validate("runner")
    def _validate_runner(self, proposal: dict) -> str:
        if proposal["value"] not in ("auto", *RUNNERS):
            raise ValueError(f"BatchSpawner.runner: {proposal['value']!r} is not one of auto, {', '.join(RUNNERS)}")
        return proposal["value"]

    command_timeout = Float(30.0, help="Seconds a scheduler command may take before it is killed.").tag(config=True)

    job_template = Unicode(
        "",
        help="Job script template name (for example 'slurm.sh.j2'); empty uses the scheduler's own.",
    ).tag(config=True)

    job_template_dirs = List(
        Unicode(),
        help="Directories searched for job templates before the packaged ones, so admins can override "
        "or extend them ({% extends 'slurm.sh.j2' %}).",
    ).tag(config=True)

    job_name = Unicode(
        "jupyterhub-{username}",
        help="Batch job name; {username} and {servername} are replaced.",
    ).tag(config=True)

    req_partition = Unicode("", help="Partition (queue) of the job; empty for the scheduler's default.").tag(config=True)
    req_account = Unicode("", help="Account (project) the job is charged to; empty for the user's default.").tag(config=True)
    req_qos = Unicode("", help="Quality of service; empty for the default.").tag(config=True)
    req_reservation = Unicode("", help="Reservation to run in; empty for none.").tag(config=True)
    req_constraint = Unicode("", help="Node features the job needs (Slurm --constraint); empty for none.").tag(config=True)
    req_nprocs = Integer(1, min=1, help="CPU cores for the single-user server.").tag(config=True)
    req_ngpus = Integer(0, min=0, help="GPUs for the single-user server.").tag(config=True)
    req_memory = Unicode("", help="Memory, for example '4G' or '512M'; empty for the scheduler's default.").tag(config=True)
    req_runtime = Unicode("01:00:00", help="Walltime in Slurm's forms (HH:MM:SS, D-HH:MM:SS, minutes).").tag(config=True)
    req_prologue = List(
        Unicode(),
        help="Admin shell lines run in the job before the server starts (module loads, conda activate...).",
    ).tag(config=True)
    req_extra_directives = List(
        Unicode(),
        help="Admin-only scheduler directives added verbatim, one per entry, e.g. '--exclusive'.",
    ).tag(config=True)

    walltime_warnings = List(
        Integer(min=1),
        [900, 300],
        help="Seconds before the job's walltime ends at which JupyterLab warns the user (hpchub's walltime "
        "extension in the job); [] for none.",
    ).tag(config=True)

    walltime_signal_lead = Integer(
        120,
        min=0,
        help="Seconds before the walltime ends at which the scheduler signals the job (Slurm --signal, Grid "
        "Engine s_rt) so that the server shuts down cleanly, saving what it can; 0: no early signal.",
    ).tag(config=True)

    @validate("req_memory")
    def _validate_memory(self, proposal: dict) -> str:
        parse_memory_mb(proposal["value"])
        return proposal["value"]

    @validate("req_runtime")
    def _validate_runtime(self, proposal: dict) -> str:
        parse_walltime_s(proposal["value"])
        return proposal["value"]

    job_log_dir = Unicode(
        "{home}/.hpchub/logs",
        help="Directory, created as the user, for job output; {home} and {username} are replaced.",
    ).tag(config=True)

    job_run_dir = Unicode(
        "{home}/.hpchub/run",
        help="Private directory (mode 0700), created as the user, for each job's environment file, which holds "
        "the server's tokens: job scripts carry no secret, since schedulers keep scripts where others may read "
        "them. It must be on a filesystem the compute nodes see. {home} and {username} are replaced.",
    ).tag(config=True)

    batchspawner_singleuser_cmd = List(
        Unicode(),
        help="Wrapper that starts the server in the job: it picks a port, reports it to the hub and execs "
        "the server command. Default: batchspawner-singleuser next to the hub's Python.",
    ).tag(config=True)

    @default("batchspawner_singleuser_cmd")
    def _default_singleuser_cmd(self) -> list[str]:
        return [beside_python("batchspawner-singleuser")]

    ledger_url = Unicode(
        "sqlite:///hpchub_ledger.sqlite",
        help="SQLAlchemy URL of the job ledger (its own database, apart from JupyterHub's), e.g. "
        "postgresql+psycopg://hpchub@dbhost/hpchub (install hpchub[postgresql]). The `hpchub` command puts it in its data directory.",
    ).tag(config=True)

    job_poll_interval = Float(
        30.0,
        min=1.0,
        help="Seconds between the scheduler queries for running jobs. One query covers every job of the "
        "scheduler (all users), so this is the load the hub puts on it.",
    ).tag(config=True)

    job_poll_fast_first = Float(
        0.5,
        min=0.05,
        help="First check of a new job, in seconds; checks of new and pending jobs double from here up to "
        "job_poll_fast_max.",
    ).tag(config=True)

    job_poll_fast_max = Float(10.0, min=0.1, help="Longest pause between checks of a pending job.").tag(config=True)

    queue_timeout = Integer(
        3600,
        min=1,
        help="Seconds a job may wait in the queue before the spawn is abandoned and the job cancelled.",
    ).tag(config=True)

    server_start_timeout = Integer(
        300,
        min=1,
        help="Seconds from the job starting to its server reporting its port (imports on a shared "
        "filesystem can be slow).",
    ).tag(config=True)

    stop_timeout = Float(
        10.0,
        help="Seconds stop() waits for the scheduler to confirm the job ended; the cancel then goes on in the "
        "background (cancel_retry_timeout).",
    ).tag(config=True)

    cancel_retry_timeout = Float(
        3600.0,
        help="Seconds a cancel is retried in the background while the scheduler cannot be reached; a hub "
        "restarted meanwhile finishes it (the job ledger keeps it CANCELLING).",
    ).tag(config=True)

    log_tail_lines = Integer(20, min=0, help="Lines of the job's output shown when a job fails.").tag(config=True)

    max_concurrent_submissions = Integer(
        20,
        min=1,
        help="Submissions (script rendering and the scheduler's submit command) in flight at once per scheduler. "
        "This, not JupyterHub's concurrent_spawn_limit, bounds a class of users starting at once: a job "
        "waiting in the queue holds no slot here.",
    ).tag(config=True)

    clusters = Dict(
        key_trait=Unicode(),
        value_trait=Dict(),
        help="""The clusters users may run on, by name: each a table as in hpchub's TOML file (scheduler,
        runner, ssh, tunnel, job templates, partitions with the admin's caps; see docs/config.md). Used with
        `profiles`; when `profiles` is empty the req_* settings describe the one job everyone gets.""",
    ).tag(config=True)

    profiles = List(
        Dict(),
        help="""The profiles users choose from in the spawn form (or name in the REST API's user_options), in
        display order: each a table with a "name", its cluster, defaults, bounds, the fields users may edit,
        the groups that may use it and the environment set-up (see docs/config.md). Form and REST input are
        validated against the profile and the partition's live limits; anything else is refused with HTTP
        400 naming the field.""",
    ).tag(config=True)

    tunnel = Enum(
        ["direct", "reverse"],
        "direct",
        help="""How the hub reaches the server in a job. 'direct': the server listens on the compute node's
        address and reports its port; only for nodes the hub can route to, whose ports no other user can
        take. 'reverse': the job opens one outbound SSH connection to the hub's tunnel gateway, its server
        listens on a private Unix socket on the node, and nothing listens on a network address (see
        docs/tunnel.md).""",
    ).tag(config=True)

    tunnel_gateway_ip = Unicode(
        "0.0.0.0",
        help="Address the tunnel gateway listens on (reverse mode): one the compute nodes can reach.",
    ).tag(config=True)

    tunnel_gateway_port = Integer(8022, min=1, max=65535, help="Port of the tunnel gateway.").tag(config=True)

    tunnel_gateway_address = Unicode(
        "",
        help="Host name or address the jobs dial to reach the gateway, as written in their known_hosts "
        "line; empty: tunnel_gateway_ip when it is a single address, else this host's fully qualified name.",
    ).tag(config=True)

    tunnel_host_key_file = Unicode(
        "hpchub_tunnel_host_key",
        help="The gateway's SSH host key (Ed25519, mode 0600), generated on first use and kept: jobs check "
        "it. Relative paths are taken from the hub's working directory.",
    ).tag(config=True)

    tunnel_ssh_client = Enum(
        ["auto", "asyncssh", "openssh"],
        "auto",
        help="SSH client of the job's tunnel: asyncssh when the job's Python has it (auto), or OpenSSH's ssh.",
    ).tag(config=True)

    tunnel_keepalive_interval = Float(
        15.0, min=1.0,
        help="Seconds between keepalives on a tunnel (both ends); three unanswered ones drop it and its route.",
    ).tag(config=True)

    tunnel_reconnect_timeout = Float(
        300.0, min=5.0,
        help="A job whose tunnel stays down this long ends itself, freeing its node.",
    ).tag(config=True)

    tunnel_client_cmd = List(
        Unicode(),
        help="The job-side tunnel client. Default: hpchub-tunnel next to the hub's Python.",
    ).tag(config=True)

    @default("tunnel_client_cmd")
    def _default_tunnel_client_cmd(self) -> list[str]:
        return [beside_python("hpchub-tunnel")]

    @default("server_token_scopes")
    def _default_server_token_scopes(self) -> list[str]:
        # JupyterHub's server role, plus reading the user's own servers: `hpchub-status` in the notebook's
        # terminal works with the server's token. Nothing of other users, no admin scope.
        return ["users:activity!user", "access:servers!server", "read:servers!user"]

    @default("start_timeout")
    def _default_start_timeout(self) -> int:
        # JupyterHub's own limit wraps the whole start(); the two limits above are the ones that decide.
        return self.queue_timeout + self.server_start_timeout + 60

    @default("ip")
    def _default_ip(self) -> str:
        return "0.0.0.0"

    @default("env_keep")
    def _default_env_keep(self) -> list[str]:
        # the job's environment is the user's on the node, not the hub's
        return []

    job_id = Unicode("")
    job_tag = Unicode("")
    job_host = Unicode("")
    job_port = Integer(0)
    job_env_file = Unicode("")
    #: the cluster (of `clusters`) the job runs on; "" without profiles
    job_cluster = Unicode("")
    #: the walltime asked for (0: the partition's default, not known here) and when the job started (epoch s)
    job_walltime_s = Integer(0)
    job_started = Float(0.0)
    #: the tunnel credential's public part (tunnel.credentials.CredentialStore.state), to restore it after
    #: a hub restart
    job_tunnel = Dict(None, allow_none=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._port: asyncio.Future[int] | None = None
        self._hub_gateway: HubGateway | None = None
        #: the validated user options of this spawn (with profiles)
        self.choice: Choice | None = None
        #: (clusters, profiles, their Catalog): the last parse, for these very trait values
        self._catalog: tuple[dict, list, Catalog] | None = None
        self._tunnel_change: dict = {"last_change": None, "reason": ""}
        self._resume: tuple[str, str, str] | None = None
        self._adapter: Adapter | None = None
        #: set by auth_state_hook from the authenticator's auth_state (hpchub.ldap.PosixAccount)
        self.auth_state_account = None
        self._events: list[dict] = []
        self._events_changed = asyncio.Event()

    # -- state --------------------------------------------------------------------------------
    def get_state(self) -> dict:
        state = super().get_state()
        if self.job_id:
            state.update(job_id=self.job_id, job_tag=self.job_tag, job_host=self.job_host, job_port=self.job_port,
                         job_env_file=self.job_env_file, job_cluster=self.job_cluster)
            if self.job_tunnel:
                state["job_tunnel"] = self.job_tunnel
            if self.job_started:
                state.update(job_started=self.job_started, job_walltime_s=self.job_walltime_s)
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.job_id = state.get("job_id", "")
        self.job_tag = state.get("job_tag", "")
        self.job_host = state.get("job_host", "")
        self.job_port = state.get("job_port", 0)
        self.job_env_file = state.get("job_env_file", "")
        self.job_cluster = state.get("job_cluster", "")
        self.job_tunnel = state.get("job_tunnel")
        self.job_started = state.get("job_started", 0.0)
        self.job_walltime_s = state.get("job_walltime_s", 0)

    def clear_state(self) -> None:
        super().clear_state()
        self.clear_job()
        self.job_cluster = ""

    def _persist_state(self) -> None:
        """Save the job id now: JupyterHub saves state only after start() returns, and a hub restart
        while the job is queued would otherwise forget it."""
        if self.orm_spawner is not None and self.user is not None:
            self.orm_spawner.state = self.get_state()
            self.user.db.commit()

    # -- clusters and profiles ------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog | None:
        """`clusters` and `profiles`, parsed once per configuration (hub-wide); None without profiles. Read on
        every adapter access: the spawner keeps the answer for the trait values it was computed from."""
        if not self.profiles:
            return None
        if self._catalog is None or self._catalog[0] is not self.clusters or self._catalog[1] is not self.profiles:
            key = json.dumps([self.clusters, self.profiles], sort_keys=True, default=str)
            if key not in _catalogs:
                try:
                    _catalogs[key] = parse_catalog(self.clusters, self.profiles,
                                                   source="BatchSpawner.clusters/profiles")
                except ConfigError as err:
                    raise SpawnException(f"The hub's cluster configuration is invalid: {err}", reason="config",
                                         status_code=500) from err
            self._catalog = (self.clusters, self.profiles, _catalogs[key])
        return self._catalog[2]

    @property
    def cluster_spec(self) -> ClusterSpec | None:
        """The cluster this server's job runs on (with profiles): the chosen one, or the saved one."""
        name = self.job_cluster or (self.choice.cluster.name if self.choice else "")
        catalog = self.catalog if name else None
        return catalog.clusters.get(name) if catalog else None

    @property
    def cluster_name(self) -> str:
        """How the ledger and the poller name the job's cluster: the cluster's name, else the scheduler."""
        spec = self.cluster_spec
        return spec.name if spec else self.scheduler

    @property
    def tunnel_mode(self) -> str:
        spec = self.cluster_spec
        return spec.tunnel if spec else self.tunnel

    def user_groups(self) -> list[str]:
        """The user's JupyterHub groups and, with LDAP, the directory's groups: what profiles are shown to."""
        groups = [group.name for group in getattr(self.user, "groups", [])]
        if self.auth_state_account is not None:
            groups += list(self.auth_state_account.groups)
        return list(dict.fromkeys(groups))

    async def live_partitions(self, cluster: ClusterSpec) -> list[PartitionInfo] | None:
        """The cluster's partitions and limits now (cached about a minute, hub-wide); None when the scheduler
        cannot say (then only the admin's caps apply)."""
        cache = _partition_cache(cluster.name, self._cluster_adapter(cluster))
        try:
            return list((await cache.get()).partitions)
        except SchedulerError as err:
            self.log.warning("No partition limits from cluster %s: %s", cluster.name, err)
            return None

    async def user_associations(self, cluster: ClusterSpec) -> Associations | None:
        try:
            return await self._cluster_adapter(cluster).associations(self.run_as_for(cluster) or self.user.name)
        except SchedulerError as err:
            self.log.warning("No accounts of %s from cluster %s: %s", self._log_name, cluster.name, err)
            return None

    async def validate_user_options(self, options: Any) -> Choice:
        """user_options (from the form or the REST API) -> a Choice; FormError naming the field otherwise.
        Only the chosen profile's cluster is asked for its live limits."""
        catalog = self.catalog
        groups = self.user_groups()
        cluster = profile_for(options, catalog.profiles, groups).cluster
        live = await self.live_partitions(cluster)
        return validate_options(options, profiles=catalog.profiles, user_groups=groups,
                                partitions={cluster.name: live} if live is not None else {},
                                associations={cluster.name: await self.user_associations(cluster)})

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        return _apply_profile_options

    @default("options_form")
    def _default_options_form(self) -> Any:
        return _render_options_form if self.profiles else ""

    @default("options_from_form")
    def _default_options_from_form(self) -> Any:
        return options_from_form if self.profiles else self._passthrough_options_from_form

    async def options_form_html(self) -> str:
        """The spawn form: the profiles the user may use, each with the live limits of its partitions, the
        user's accounts, and the last choices pre-filled."""
        profiles = visible_profiles(self.catalog.profiles, self.user_groups())
        clusters = {profile.cluster.name: profile.cluster for profile in profiles}
        partitions, associations = {}, {}
        for name, cluster in clusters.items():
            live = await self.live_partitions(cluster)
            if live is not None:
                partitions[name] = live
            associations[name] = await self.user_associations(cluster)
        return render_form(profiles, partitions=partitions, associations=associations,
                           last=self.orm_spawner.user_options if self.orm_spawner is not None else None,
                           user_name=self.user.name, server_name=self.name or "")

    async def preview_script(self, options: Any) -> str:
        """The job script a spawn with `options` would submit now (FormError when they are refused). It
        holds no secret: tokens and keys go to the job's private environment file."""
        if self.catalog is None:
            raise FormError("profile", "this hub has no profiles to choose from")
        choice = await self.validate_user_options(options)
        home = await self.user_home(choice.cluster)
        # the rendering reads the spawn's own attributes: borrowed without an await in between, so that a
        # spawn of this server going on meanwhile never sees them
        saved = (self.choice, self.job_cluster, self.job_tag, self.job_env_file, self.job_walltime_s)
        try:
            self.choice, self.job_cluster = choice, choice.cluster.name
            self.job_tag = "preview"
            self.job_env_file = os.path.join(self._format(self.job_run_dir, home), f"{self.job_tag}.env")
            return self.render_script(self.build_request(home))
        finally:
            self.choice, self.job_cluster, self.job_tag, self.job_env_file, self.job_walltime_s = saved

    # -- the pieces ---------------------------------------------------------------------------
    def make_runner(self) -> Runner:
        return _make_runner(self.runner, None)

    def adapter_kwargs(self) -> dict:
        """Extra keyword arguments for this scheduler's adapter."""
        return {}

    def _cluster_adapter(self, cluster: ClusterSpec) -> Adapter:
        known = _cluster_adapters.get(cluster.name)
        if known is None or known[0] != cluster:
            adapter = get_adapter(cluster.scheduler)(_make_runner(cluster.runner, cluster),
                                                     command_timeout=cluster.command_timeout,
                                                     **cluster.adapter_kwargs())
            _cluster_adapters[cluster.name] = known = (cluster, adapter)
        return known[1]

    @property
    def adapter(self) -> Adapter:
        spec = self.cluster_spec
        if spec is not None:
            return self._cluster_adapter(spec)
        if self._adapter is None:
            adapter_class = get_adapter(self.scheduler)
            self._adapter = adapter_class(self.make_runner(), command_timeout=self.command_timeout,
                                          **self.adapter_kwargs())
        return self._adapter

    @default("auth_state_hook")
    def _default_auth_state_hook(self) -> Any:
        # with LDAP and enable_auth_state, jobs run as the directory's account, in its home
        return auth_state_hook

    @property
    def run_as(self) -> str | None:
        """The Unix account jobs run as (the directory's uid when the authenticator gave one), or None when
        the runner runs everything as the hub's user."""
        return self._account_on(self.adapter)

    def run_as_for(self, cluster: ClusterSpec) -> str | None:
        """run_as, for a job on `cluster`."""
        return self._account_on(self._cluster_adapter(cluster))

    def _account_on(self, adapter: Adapter) -> str | None:
        if not adapter.runner.switches_user:
            return None
        return self.auth_state_account.name if self.auth_state_account else self.user.name

    async def user_home(self, cluster: ClusterSpec | None = None) -> str:
        """Home directory of the account the job (on `cluster`, default this server's) runs as: the
        directory's, else NSS (which may itself be LDAP: looked up off the event loop)."""
        name = self.run_as_for(cluster) if cluster is not None else self.run_as
        if self.auth_state_account is not None and name is not None:
            return self.auth_state_account.home
        entry = await asyncio.to_thread(pwd.getpwnam, name) if name else pwd.getpwuid(os.getuid())
        return entry.pw_dir

    def _format(self, template: str, home: str) -> str:
        return template.format(home=home, username=self.user.name, servername=self.name or "")

    def build_request(self, home: str) -> JobRequest:
        log_dir = self._format(self.job_log_dir, home)
        try:
            request = self._request(home, log_dir)
        except InvalidRequest as err:
            raise SpawnException(f"Cannot submit this job: {err}", reason="invalid-request") from err
        self.job_walltime_s = request.walltime_s or 0
        return request

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        if self.job_walltime_s:
            # for the walltime extension in the job's server (hpchub.walltime)
            env["HPCHUB_WALLTIME_S"] = str(self.job_walltime_s)
            env["HPCHUB_WALLTIME_WARNINGS"] = ",".join(str(s) for s in sorted(self.walltime_warnings, reverse=True))
        return env

    @property
    def walltime_left_s(self) -> int | None:
        """Seconds of walltime the running job has left (from when the hub saw it start), None if unknown."""
        if not (self.job_started and self.job_walltime_s):
            return None
        return max(0, int(self.job_started + self.job_walltime_s - time.time()))

    def _request(self, home: str, log_dir: str) -> JobRequest:
        # the name is only a label: characters a scheduler would refuse become '-'
        name = re.sub(r"[^A-Za-z0-9_.+-]", "-", self._format(self.job_name, home))
        output = os.path.join(log_dir, "jupyterhub-%j.log")
        signal_lead = self.walltime_signal_lead or None
        if self.choice is not None:
            return self.choice.job_request(name=name, tag=self.job_tag, workdir=home, output=output,
                                           signal_before_end_s=signal_lead)
        return JobRequest(
            name=name,
            tag=self.job_tag,
            cores=self.req_nprocs,
            memory_mb=parse_memory_mb(self.req_memory),
            gpus=self.req_ngpus,
            walltime_s=parse_walltime_s(self.req_runtime),
            partition=self.req_partition or None,
            account=self.req_account or None,
            qos=self.req_qos or None,
            reservation=self.req_reservation or None,
            constraint=self.req_constraint or None,
            workdir=home,
            output=output,
            env_setup=tuple(self.req_prologue),
            extra_directives=tuple(self.req_extra_directives),
            signal_before_end_s=signal_lead,
        )

    def render_script(self, request: JobRequest) -> str:
        try:
            spec = self.cluster_spec
            return render_job_script(
                (spec.job_template if spec else "") or self.job_template or self.adapter.template,
                request,
                user=self.user.name,
                env_file=self.job_env_file,
                command=self.job_command(),
                template_dirs=(spec.job_template_dirs if spec else ()) or self.job_template_dirs,
            )
        except TemplateValueError as err:
            raise SpawnException(f"Cannot build the job script: {err}", reason="invalid-request") from err

    def job_command(self) -> list[str]:
        """What the job runs: the server behind its wrapper, behind the tunnel client in reverse mode."""
        prefix = self.choice.command_prefix if self.choice is not None else ()
        server = [*prefix, *self.batchspawner_singleuser_cmd, *self.cmd, *self.get_args()]
        if self.tunnel_mode == "direct":
            return server
        settings = self.gateway_settings()
        return [
            *self.tunnel_client_cmd,
            "--gateway", _host_port(self.gateway_address(), settings.port),
            "--user", self.job_tag,
            "--key-env", TUNNEL_KEY_VAR,
            "--known-hosts-env", TUNNEL_KNOWN_HOSTS_VAR,
            "--local", "auto",
            "--hub-api-local", "127.0.0.1:0",
            "--hub-api-remote", _host_port(*settings.hub_api),
            "--keepalive", f"{self.tunnel_keepalive_interval:g}",
            "--connect-timeout", str(self.server_start_timeout),
            "--reconnect-timeout", f"{self.tunnel_reconnect_timeout:g}",
            "--ssh", self.tunnel_ssh_client,
            "--", *server,
        ]

    def gateway_settings(self) -> GatewaySettings:
        api = urlsplit(self.hub.api_url)
        spec = self.cluster_spec
        return GatewaySettings(
            ip=self.tunnel_gateway_ip, port=spec.gateway[1] if spec and spec.gateway else self.tunnel_gateway_port,
            host_key_file=os.path.abspath(self.tunnel_host_key_file),
            hub_api=(api.hostname or "127.0.0.1", api.port or (443 if api.scheme == "https" else 80)),
            keepalive_interval=self.tunnel_keepalive_interval,
        )

    def gateway_address(self) -> str:
        """The gateway's address as jobs dial it."""
        spec = self.cluster_spec
        if spec is not None and spec.gateway:
            return spec.gateway[0]
        if self.tunnel_gateway_address:
            return self.tunnel_gateway_address
        if self.tunnel_gateway_ip not in ("", "0.0.0.0", "::"):
            return self.tunnel_gateway_ip
        return socket.getfqdn()

    async def hub_gateway(self) -> HubGateway:
        """The hub's tunnel gateway (reverse mode), started on first use."""
        if self._hub_gateway is None:
            try:
                self._hub_gateway = await shared_gateway(self.gateway_settings(), self.log)
            except (OSError, ValueError) as err:
                raise SpawnException(f"The hub's tunnel gateway cannot start on {self.tunnel_gateway_ip}:"
                                     f"{self.gateway_settings().port}: {err}", reason="tunnel-gateway",
                                     status_code=500) from err
        return self._hub_gateway

    def node_host(self, status: JobStatus) -> str:
        """Where the hub connects to the server: the job's (first) node."""
        if not status.nodes:
            raise SpawnException(f"The scheduler reports job {self.job_id} running but names no node",
                                 reason="no-node", status_code=500)
        return status.nodes[0]

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> tuple[str, int] | str:
        self._refuse_root()
        self._port = asyncio.get_running_loop().create_future()
        self._events = []
        if self.tunnel_mode == "reverse":
            await self.hub_gateway()
        home = await self.user_home()
        if await self._adopt_queued_job():
            request = self.build_request(home)
        else:
            self.clear_job()
            self.job_tag = uuid.uuid4().hex
            request = self.build_request(home)
            await self._submit(home, request)
        try:
            status = await self._wait_until_running(request)
            self.job_started = time.time()
            self.job_host = self.node_host(status)
            self._event(f"Job {self.job_id} is running on {self.job_host}; starting JupyterLab", 50)
            if self.tunnel_mode == "reverse":
                return await self._start_tunnelled(request)
            self.job_port = await self._wait_for_server(self._port, request, "report its port")
        except BaseException:
            await self._cancel_quietly()
            self.poller.untrack(self.job_id)
            self._forget_tunnel()
            await self._remove_env_file()
            raise
        self._persist_state()
        self._event(f"Server in job {self.job_id} listens on {self.job_host}:{self.job_port}", 90)
        return self.job_host, self.job_port

    async def _start_tunnelled(self, request: JobRequest) -> str:
        hub_gateway = await self.hub_gateway()
        # the first-use window of the job's key restarts now that it runs: the queue wait does not count
        hub_gateway.credentials.expect_first_use(self.job_tag, self.server_start_timeout)
        endpoint = await self._wait_for_server(
            hub_gateway.gateway.wait_up(self.job_tag, self.server_start_timeout), request, "open its tunnel")
        self.job_port = endpoint.port
        self._persist_state()
        self._event(f"Server in job {self.job_id} on {self.job_host} is reachable through its tunnel", 90)
        return endpoint.url

    async def _submit(self, home: str, request: JobRequest) -> None:
        async with submission_slots(self.cluster_name, self.max_concurrent_submissions):
            await self._submit_now(home, request)

    async def _submit_now(self, home: str, request: JobRequest) -> None:
        self.job_env_file = os.path.join(self._format(self.job_run_dir, home), f"{self.job_tag}.env")
        script = self.render_script(request)
        await self._write_job_files(os.path.dirname(request.output or ""))
        await self.ledger.record_submission(tag=self.job_tag, user=self.user.name, server_name=self.name or "",
                                            cluster=self.cluster_name, request=request, script=script,
                                            log_path=request.output or "")
        try:
            self.job_id = await self.adapter.submit(script, request, user=self.run_as)
        except SubmitRejected as err:
            await self.ledger.rejected(self.job_tag, err.reason)
            await self._remove_env_file()
            raise SpawnException(f"The scheduler refused the job: {err.reason}", reason="submit-rejected") from err
        except SchedulerError as err:
            await self.ledger.rejected(self.job_tag, str(err))
            await self._remove_env_file()
            raise SpawnException(f"The scheduler could not be reached to submit the job: {err}",
                                 reason="scheduler-unavailable", status_code=503) from err
        await self.ledger.submitted(self.job_tag, self.job_id)
        self._persist_state()
        self.log.info("Submitted job %s for %s", self.job_id, self._log_name)
        self._event(f"Submitted batch job {self.job_id}", 10)

    def keep_queued_job(self) -> None:
        """Before a spawn is resumed after a hub restart: JupyterHub clears the state when a spawn begins,
        so the queued job's identity is set aside for start() to adopt."""
        self._resume = (self.job_id, self.job_tag, self.job_env_file) if self.job_id and self.job_tag else None

    async def _adopt_queued_job(self) -> bool:
        """After a hub restart, take back the job this server was waiting for instead of submitting again.

        The job reads its environment file when it starts, so a job still queued gets this spawn's new
        tokens. One that started while the hub was down holds tokens that no longer work: it is replaced."""
        resume, self._resume = self._resume, None
        if resume is None:
            return False
        self.job_id, self.job_tag, self.job_env_file = resume
        status = await self.poller.refresh(self.job_id, max_age=0)
        if status.state in (JobState.PENDING, JobState.UNKNOWN):
            await self._write_env_file()
            self.log.info("Adopted queued job %s for %s after a hub restart", self.job_id, self._log_name)
            self._event(f"Job {self.job_id} is still queued (taken back after a hub restart)", 15)
            return True
        if not status.state.is_terminal:
            self.log.warning("Job %s of %s started while the hub was down: replacing it", self.job_id, self._log_name)
            await self._cancel_quietly("replaced: it started while the hub was down")
        self.poller.untrack(self.job_id)
        return False

    def _refuse_root(self) -> None:
        runs_as_hub = self.run_as is None
        if (runs_as_hub and os.geteuid() == 0) or self.run_as == "root":
            raise SpawnException(
                "hpchub does not run jobs as root: run the hub as an ordinary user, or keep "
                "BatchSpawner.runner at 'auto' or 'sudo' so that jobs run as the logged-in user.",
                reason="root-job", status_code=500,
            )

    def clear_job(self) -> None:
        self.job_id = self.job_tag = self.job_host = self.job_env_file = ""
        self.job_port = 0
        self.job_tunnel = None
        self.job_started = 0.0
        self.job_walltime_s = 0

    async def _as_user(self, argv: list[str], what: str, *, stdin: str | None = None) -> None:
        """Run a file command as the job's user; failures become a SpawnException saying `what` failed."""
        try:
            result = await self.adapter.runner.run(argv, user=self.run_as, stdin=stdin, timeout=self.command_timeout)
        except SchedulerError as err:
            raise SpawnException(f"Cannot {what}: {err}", reason="job-files") from err
        if result.returncode != 0:
            raise SpawnException(f"Cannot {what}: {result.stderr.strip()}", reason="job-files")

    async def _write_job_files(self, log_dir: str) -> None:
        run_dir = os.path.dirname(self.job_env_file)
        making = [self._as_user(["install", "-d", "-m", "700", "--", run_dir],
                                f"create the private directory {run_dir}")]
        if log_dir:
            making.append(self._as_user(["mkdir", "-p", "--", log_dir], f"create the job log directory {log_dir}"))
        # at once: each waits mostly for sudo, and mkdir -p tolerates a parent made meanwhile
        await asyncio.gather(*making)
        await self._write_env_file()

    async def _write_env_file(self) -> None:
        """The server's environment (this spawn's tokens, and in reverse mode a fresh tunnel credential) into
        the job's file, which the job reads at start."""
        env = self.get_env()
        if self.tunnel_mode == "reverse":
            env.update(await self._issue_tunnel_credential())
        await self._as_user(["dd", f"of={self.job_env_file}", "status=none"],
                            f"write the job environment file {self.job_env_file}",
                            stdin=render_env_file(env))

    # -- the tunnel (reverse mode) ----------------------------------------------------------------
    async def _issue_tunnel_credential(self) -> dict[str, str]:
        """A one-time key for this job, valid until the job has had time to queue and start, and the
        gateway's host key line: the job's tunnel client reads both from its environment file."""
        hub_gateway = await self.hub_gateway()
        credential = hub_gateway.credentials.issue(
            self.job_tag, first_use_within=self.queue_timeout + self.server_start_timeout)
        hub_gateway.attach(self.job_tag, self)
        self.job_tunnel = hub_gateway.credentials.state(self.job_tag)
        return {TUNNEL_KEY_VAR: credential.private_key,
                TUNNEL_KNOWN_HOSTS_VAR: hub_gateway.gateway.known_hosts_line(self.gateway_address())}

    async def _reattach_tunnel(self) -> None:
        """After a hub restart: register the running job's credential again (its client reconnects) and,
        until it has, point the server at port 0 so that no route leads to a port someone else may hold
        (get_url waits for the tunnel)."""
        hub_gateway = await self.hub_gateway()
        if hub_gateway.credentials.state(self.job_tag) is not None:
            return
        # the server was up before the restart: its key was used, so it has no first-use deadline now
        hub_gateway.credentials.restore({**self.job_tunnel, "used": True})
        hub_gateway.attach(self.job_tag, self)
        self.log.info("Waiting for the tunnel of job %s of %s to reconnect", self.job_id, self._log_name)
        endpoint = hub_gateway.gateway.endpoint(self.job_tag)
        self._set_server_port(endpoint.port if endpoint else 0)

    def _forget_tunnel(self) -> None:
        if self._hub_gateway is not None and self.job_tag:
            self._hub_gateway.detach(self.job_tag)
        self.job_tunnel = None

    async def get_url(self) -> str:
        """Asked by JupyterHub at start-up for a server that poll() says runs: in reverse mode, the endpoint
        once the job's tunnel has reconnected (within http_timeout; after that JupyterHub, finding nothing
        at port 0, stops the server)."""
        if self.tunnel_mode == "reverse" and self.job_tag and self._hub_gateway is not None:
            try:
                endpoint = await self._hub_gateway.gateway.wait_up(self.job_tag, self.http_timeout)
            except asyncio.TimeoutError:
                self.log.error("The tunnel of job %s of %s did not come back within %s s of the hub's start",
                               self.job_id, self._log_name, self.http_timeout)
            else:
                self._set_server_port(endpoint.port)
        return await super().get_url()

    def _set_server_port(self, port: int) -> None:
        if self.server is not None and self.server.port != port:
            self.server.port = port
            self.job_port = port
            self.user.db.commit()

    @property
    def _proxy(self) -> Any:
        return self.user.settings.get("proxy") if self.user is not None else None

    def tunnel_status(self) -> dict:
        """The tunnel as the hub sees it now: {"mode": "direct"} or {"mode": "reverse", "up": bool,
        "endpoint": "127.0.0.1:PORT" or None, "last_change": ISO time or None, "reason": why it went down}."""
        if self.tunnel_mode == "direct":
            return {"mode": "direct"}
        endpoint = None
        if self._hub_gateway is not None and self.job_tag:
            endpoint = self._hub_gateway.gateway.endpoint(self.job_tag)
        return {"mode": "reverse", "up": endpoint is not None, "endpoint": str(endpoint) if endpoint else None,
                **self._tunnel_change}

    def _note_tunnel_event(self, event: TunnelEvent) -> None:
        self._tunnel_change = {"last_change": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "reason": event.reason}

    async def tunnel_up(self, event: TunnelEvent) -> None:
        """The job's tunnel came (back) up: once its server answers there, its route is restored."""
        self._note_tunnel_event(event)
        if self.pending or self.server is None or self._proxy is None:
            # starting: start() returns the endpoint; checked at the hub's start: get_url gives it. JupyterHub
            # adds the route then.
            return
        self._set_server_port(event.endpoint.port)
        try:
            await self.server.wait_up(http=True, timeout=self.http_timeout, extra_path="api")
        except (asyncio.TimeoutError, TimeoutError):
            self.log.warning("The tunnel of job %s of %s is back, but its server does not answer at %s",
                             self.job_id, self._log_name, self.server.url)
            return
        await self._proxy.add_user(self.user, self.name)
        self.log.info("Tunnel of job %s of %s is back: route restored to %s", self.job_id, self._log_name,
                      event.endpoint)

    async def tunnel_down(self, event: TunnelEvent) -> None:
        """The job's tunnel is down: the route goes until it is back (the job's client reconnects)."""
        self.log.warning("Tunnel of job %s of %s is down (%s)", self.job_id, self._log_name, event.reason)
        self._note_tunnel_event(event)
        self._set_server_port(0)
        if not self.pending and self.server is not None and self._proxy is not None:
            await self._proxy.delete_user(self.user, self.name)

    async def _remove_env_file(self) -> None:
        if not self.job_env_file:
            return
        try:
            await self._as_user(["rm", "-f", "--", self.job_env_file], f"remove {self.job_env_file}")
        except SpawnException as err:
            self.log.warning("%s", err)

    @property
    def poller(self) -> JobPoller:
        """The hub-wide poller of this scheduler, shared with every other server's spawner."""
        runner = self.adapter.runner
        key = (self.cluster_name, type(runner), tuple(sorted(self.adapter_kwargs().items())))
        ledger, cluster = self.ledger, self.cluster_name

        async def record(statuses: dict[str, JobStatus]) -> None:
            await ledger.update(cluster, statuses.values())

        return shared_poller(key, lambda: JobPoller(
            self.adapter, interval=self.job_poll_interval, fast_first=self.job_poll_fast_first,
            fast_max=self.job_poll_fast_max, on_update=record,
        ))

    @property
    def ledger(self) -> Ledger:
        return shared_ledger(self.ledger_url)

    async def _wait_until_running(self, request: JobRequest) -> JobStatus:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        last_reason = unavailable = None
        while True:
            try:
                status = await asyncio.wait_for(self._next_status(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise SpawnException(
                    f"Job {self.job_id} waited {self.queue_timeout} s in the queue without starting"
                    + (f" (last reason: {last_reason})" if last_reason else "") + "; it was cancelled.",
                    reason="queue-timeout",
                ) from None
            if status.state == JobState.RUNNING:
                return status
            if status.state.is_terminal:
                await self._fail_ended_job(status, request)
            if status.state == JobState.UNKNOWN and status.reason != unavailable:
                unavailable = status.reason
                self._event(f"The scheduler is not answering ({status.reason}); job {self.job_id} is kept, "
                            "still waiting", 20)
            if status.state == JobState.PENDING and status.reason != last_reason:
                last_reason = status.reason
                self._event(await self._queued_message(status), 20)

    async def _next_status(self) -> JobStatus:
        """The job's status from the poller's next tick, or at once when the job reports its port: a job
        that reports runs, so its node is asked for now rather than at the next (backed-off) check."""
        if self._port is None or self._port.done():
            return await self.poller.next_update(self.job_id)
        update = asyncio.ensure_future(self.poller.next_update(self.job_id))
        try:
            await asyncio.wait([update, self._port], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not update.done():
                update.cancel()
        if update.done() and not update.cancelled():
            return update.result()
        return await self.poller.refresh(self.job_id, max_age=0)

    async def _queued_message(self, status: JobStatus) -> str:
        """'Job 42 is queued (Priority): 3rd of 7 pending in debug; the scheduler expects it to start at
        14:05 UTC.' Position and estimate are asked on demand (when the reason changes), not every poll."""
        message = f"Job {self.job_id} is queued" + (f" ({status.reason})" if status.reason else "")
        try:
            position = await self.adapter.queue_position(self.job_id)
            estimate = status.estimated_start or (await self.adapter.estimate_start([self.job_id]))[self.job_id]
        except SchedulerError as err:
            self.log.warning("No queue position or start estimate for job %s: %s", self.job_id, err)
            return message + "."
        if position is not None:
            message += f": position {position.position} of {position.pending} pending in {position.partition}"
        if estimate is not None:
            message += f"; the scheduler expects it to start at {estimate.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"
        return message + "."

    async def _wait_for_server(self, signal: Awaitable[T], request: JobRequest, what: str) -> T:
        """`signal`'s result (the port reported, the tunnel up), unless the job ends first or the server
        does not `what` within server_start_timeout."""
        arrived = asyncio.ensure_future(signal)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.server_start_timeout
        try:
            while not arrived.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                update = asyncio.ensure_future(self.poller.next_update(self.job_id))
                await asyncio.wait([arrived, update], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if update.done() and update.result().state.is_terminal and not arrived.done():
                    await self._fail_ended_job(update.result(), request)
                update.cancel()
            if arrived.done() and not isinstance(arrived.exception(), asyncio.TimeoutError):
                return arrived.result()
        finally:
            if not arrived.done():
                arrived.cancel()
        raise SpawnException(
            f"The server in job {self.job_id} did not {what} within {self.server_start_timeout} s; the job "
            "was cancelled.\n" + await self._log_tail(request),
            reason="server-start-timeout",
        )

    def report_port(self, port: int) -> bool:
        """Called by the hub API when the job reports its server's port; False if not expected now."""
        if self._port is None or self._port.done():
            return False
        self._port.set_result(port)
        return True

    async def _fail_ended_job(self, status: JobStatus, request: JobRequest) -> None:
        details = ", ".join(
            part for part in (
                status.native_state or status.state.value,
                f"reason {status.reason}" if status.reason else "",
                f"exit code {status.exit_code}" if status.exit_code is not None else "",
            ) if part
        )
        raise SpawnException(
            f"Job {self.job_id} ended before the server started ({details}).\n" + await self._log_tail(request),
            reason="job-ended",
        )

    async def _log_tail(self, request: JobRequest) -> str:
        if not request.output or not self.log_tail_lines:
            return ""
        path = request.output.replace("%j", self.job_id)
        try:
            result = await self.adapter.runner.run(["tail", "-n", str(self.log_tail_lines), "--", path],
                                                   user=self.run_as, timeout=self.command_timeout)
        except SchedulerError as err:
            return f"(cannot read the job log {path}: {err})"
        if result.returncode != 0:
            return f"(cannot read the job log {path}: {result.stderr.strip()})"
        return f"Last lines of {path}:\n{result.stdout.rstrip()}"

    async def _cancel_quietly(self, note: str = "cancelled: the spawn failed") -> None:
        if not self.job_id:
            return
        try:
            await self.ledger.cancelling(self.job_tag, note)
            await self.adapter.cancel([self.job_id], user=self.run_as)
        except SchedulerError as err:
            self.log.error("Could not cancel job %s of %s: %s", self.job_id, self._log_name, err)

    async def poll(self) -> int | None:
        if not self.job_id:
            return 0
        status = await self.poller.refresh(self.job_id)
        if not status.state.is_terminal:
            if self.tunnel_mode == "reverse" and self.job_tunnel and not self._spawn_pending:
                await self._reattach_tunnel()
            # unknown is not gone: a scheduler hiccup must not mark a running server stopped
            return None
        self.poller.untrack(self.job_id)
        if status.exit_code is not None:
            return status.exit_code
        return 0 if status.state == JobState.COMPLETED else 1

    async def stop(self, now: bool = False) -> None:
        if not self.job_id:
            return
        if self.job_tag:
            await self.ledger.cancelling(self.job_tag)
            await cancel_engines(self)      # the server's ipyparallel engine jobs go with it
        job_id = self.job_id
        self._forget_tunnel()
        try:
            await self._cancel_until_ended(job_id, self.stop_timeout)
        except asyncio.TimeoutError:
            # JupyterHub forgets the server when stop() returns: the cancel goes on in the background, and
            # the ledger keeps the job CANCELLING so that a restarted hub finishes it (as an orphan)
            self.log.error("Job %s of %s not confirmed cancelled after %s s; still trying", job_id, self._log_name,
                           self.stop_timeout)
            _background(self._cancel_until_ended(job_id, self.cancel_retry_timeout))
        finally:
            await self._remove_env_file()

    async def _cancel_until_ended(self, job_id: str, timeout: float) -> None:
        """Cancel `job_id`, retrying with backoff while the scheduler cannot be reached, until the scheduler
        reports it ended. Raises asyncio.TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.5
        try:
            while True:
                try:
                    await self.adapter.cancel([job_id], user=self.run_as)
                    break
                except SchedulerError as err:
                    if loop.time() + delay > deadline:
                        raise asyncio.TimeoutError from err
                    self.log.warning("Cancel of job %s of %s failed (%s); retrying in %.1f s", job_id,
                                     self._log_name, err, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self.poller.hurry(job_id)
            while True:
                status = await asyncio.wait_for(self.poller.next_update(job_id), deadline - loop.time())
                if status.state.is_terminal:
                    self.log.info("Job %s of %s ended: %s", job_id, self._log_name, status.native_state)
                    return
        finally:
            self.poller.untrack(job_id)

    async def cancel_orphan(self, job_id: str, tag: str) -> None:
        """Cancel a job of this user that no server owns (found by the hub after a restart)."""
        self.log.warning("Cancelling orphan job %s of %s (submission %s)", job_id, self._log_name, tag)
        await self.ledger.cancelling(tag, "orphan: no server owned it when the hub restarted")
        try:
            await self._cancel_until_ended(job_id, self.cancel_retry_timeout)
        except asyncio.TimeoutError:
            self.log.error("Orphan job %s of %s not confirmed cancelled", job_id, self._log_name)

    # -- progress -----------------------------------------------------------------------------
    def _event(self, message: str, progress: int) -> None:
        self._events.append({"progress": progress, "message": message})
        self._events_changed.set()

    async def progress(self) -> AsyncIterator[dict]:
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if not self._spawn_pending:
                return
            self._events_changed.clear()
            try:
                await asyncio.wait_for(self._events_changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


_submission_semaphores: dict[str, asyncio.Semaphore] = {}


_catalogs: dict[str, Catalog] = {}
_cluster_adapters: dict[str, tuple[ClusterSpec, Adapter]] = {}
_partition_caches: dict[str, tuple[Adapter, PartitionCache]] = {}


def _make_runner(name: str, cluster: ClusterSpec | None) -> Runner:
    if name == "auto":
        name = "sudo" if os.geteuid() == 0 else "local"
    if name == "ssh":
        from schedulers.ssh import SSHRunner

        ssh = cluster.ssh
        return SSHRunner(ssh.host, username=ssh.user, client_keys=list(ssh.client_keys), known_hosts=ssh.known_hosts,
                         port=ssh.port)
    return RUNNERS[name]()


def _partition_cache(cluster: str, adapter: Adapter) -> PartitionCache:
    """The hub-wide partition cache of `cluster`, renewed when its adapter was (a changed configuration)."""
    known = _partition_caches.get(cluster)
    if known is None or known[0] is not adapter:
        _partition_caches[cluster] = known = (adapter, PartitionCache(adapter))
    return known[1]


async def _apply_profile_options(spawner: BatchSpawner, user_options: Any) -> None:
    """JupyterHub's apply_user_options hook: with profiles, validate the options before anything is submitted
    (HTTP 400 naming the field). Without profiles, options change nothing: the admin's req_* settings apply."""
    if not isinstance(spawner, BatchSpawner) or spawner.catalog is None:
        return
    try:
        spawner.choice = await spawner.validate_user_options(user_options)
    except FormError as err:
        raise web.HTTPError(400, str(err)) from err
    spawner.job_cluster = spawner.choice.cluster.name


async def _render_options_form(spawner: BatchSpawner) -> str:
    return await spawner.options_form_html()


def beside_python(program: str) -> str:
    """`program` from the hub's own bin directory (the jobs' environment), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), program)
    return beside if os.path.exists(beside) else program


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def submission_slots(scheduler: str, size: int) -> asyncio.Semaphore:
    if scheduler not in _submission_semaphores:
        _submission_semaphores[scheduler] = asyncio.Semaphore(size)
    return _submission_semaphores[scheduler]


_background_tasks: set[asyncio.Task] = set()


def _background(work) -> None:
    """Run `work` after the caller returns, keeping a reference so the task is not collected."""
    task = asyncio.ensure_future(work)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


class SlurmSpawner(BatchSpawner):
    """Single-user servers as Slurm jobs."""

    @default("scheduler")
    def _default_scheduler(self) -> str:
        return "slurm"


class GridEngineSpawner(BatchSpawner):
    """Single-user servers as (Son of) Grid Engine jobs."""

    @default("scheduler")
    def _default_scheduler(self) -> str:
        return "sge"


class PBSSpawner(BatchSpawner):
    """Single-user servers as PBS Pro / Torque jobs."""

    pbs_exec = Unicode(
        "/opt/pbs",
        allow_none=True,
        help="PBS_EXEC of the site's pbs.conf: commands run as PBS_EXEC/bin/qsub... (sudo's secure_path rarely "
        "holds it). None: find qsub, qstat and qdel on the runner's PATH.",
    ).tag(config=True)

    @default("scheduler")
    def _default_scheduler(self) -> str:
        return "pbs"

    def adapter_kwargs(self) -> dict:
        return {"pbs_exec": self.pbs_exec}


class LocalBatchSpawner(BatchSpawner):
    """Single-user servers as local processes through hpchub's small built-in batch system (`localq`):
    the same templates and lifecycle as a cluster, for a laptop or a demo."""

    local_spool_dir = Unicode(
        "",
        help="Spool directory of the local batch system; empty: hpchub-localq-<hub uid> in the temp dir.",
    ).tag(config=True)

    @default("scheduler")
    def _default_scheduler(self) -> str:
        return "local"

    @default("ip")
    def _default_ip(self) -> str:
        return "127.0.0.1"

    def adapter_kwargs(self) -> dict:
        spool = self.local_spool_dir or os.path.join(tempfile.gettempdir(), f"hpchub-localq-{os.getuid()}")
        return {"spool_dir": spool}

    def node_host(self, status: JobStatus) -> str:
        return "127.0.0.1"
