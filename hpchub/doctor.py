"""`hpchub doctor` (`hpchub-doctor`): checks what a hub needs before users find out it is missing.

The configuration loads and validates; the scheduler's commands are on the runner's PATH, the scheduler answers,
and the runner may run the user's commands (sudo -n -l for each, the submit host's key for SSH); the LDAP service
account binds on every server; the tunnel gateway's port can be listened on and is reachable at the address jobs
dial; configurable-http-proxy is installed; the hub's database and the job ledger connect; optionally a tiny job
goes through the scheduler and back (--test-job USER). Each failure says what is wrong and how to fix it; the exit
status is 1 when anything failed.

Every check is a function of plain settings (a runner, an adapter, a URL, a DirectoryConfig...), so any way of
configuring the hub can feed them: `settings_from_config` reads a traitlets Config, which `load_config` makes from
a jupyterhub_config.py and/or hpchub's TOML file.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import os
import pwd
import re
import socket
import sys
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from traitlets import TraitError
from traitlets.config import Config, PyFileConfigLoader
from traitlets.config.loader import ConfigFileNotFound

from job_templates import TemplateValueError, render_job_script
from schedulers import Adapter, JobRequest, JobState, LocalRunner, Runner, SchedulerError

OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
#: what the spawner runs as the job's user besides the scheduler's submit and cancel commands (its job files: log
#: and run directories, the environment file, log tails)
SPAWNER_FILE_COMMANDS = ("mkdir", "install", "dd", "rm", "tail")
#: configurable-http-proxy versions from which JupyterHub 6's features (Unix socket targets) work
CHP_MINIMUM = (5, 2)
COMMAND_TIMEOUT = 30.0


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


# --- configuration ------------------------------------------------------------------------------------------------

def load_config(jupyterhub_config: str | None = None, toml: str | None = None) -> Config:
    """The traitlets Config of a hub: hpchub's TOML file first (hpchub.config.load, where this hpchub has it),
    then a jupyterhub_config.py on top, as `hpchub` loads them. ValueError names the file and what is wrong."""
    config = Config()
    if toml:
        config.merge(_toml_config(toml))
    if jupyterhub_config:
        directory, name = os.path.split(os.path.abspath(jupyterhub_config))
        try:
            config.merge(PyFileConfigLoader(name, path=directory).load_config())
        except ConfigFileNotFound:
            raise ValueError(f"{jupyterhub_config}: no such file") from None
        except Exception as err:  # noqa: BLE001 - whatever the file raises is the problem to report
            raise ValueError(f"{jupyterhub_config}: {type(err).__name__}: {err}") from None
    return config


def _toml_config(path: str) -> Config:
    """The hook for hpchub's TOML configuration (hpchub/config.py, `load(path).config`)."""
    try:
        from hpchub import config as toml_config
        load = toml_config.load
    except (ImportError, AttributeError):
        raise ValueError(f"{path}: this hpchub has no TOML configuration loader; use a jupyterhub_config.py "
                         "(-f)") from None
    try:
        return load(path).config
    except Exception as err:  # noqa: BLE001 - the loader's own errors name the file and key
        raise ValueError(str(err)) from None


@dataclasses.dataclass
class Settings:
    """What the checks need, from a hub's configuration."""

    spawner: Any                       # a configured spawner instance (no user)
    authenticator_class: type
    authenticator: Any | None          # an LDAPAuthenticator instance, when that is the authenticator
    db_url: str
    ledger_url: str | None
    proxy_command: list[str] | None    # None: the hub does not start the proxy
    users: list[str]                   # users named in the configuration (allowed, admin)


def settings_from_config(config: Config) -> Settings:
    """Instantiate what the configuration names, as the hub would; ValueError says which setting is wrong."""
    from jupyterhub.proxy import ConfigurableHTTPProxy

    from batchspawner import BatchSpawner
    from hpchub.app import HpcHub
    from hpchub.ldap import LDAPAuthenticator

    config = Config(config)   # a copy: the ledger default below is this function's
    try:
        app = HpcHub(config=config)
        spawner_class, authenticator_class = app.spawner_class, app.authenticator_class
        if "ledger_url" not in config.BatchSpawner:   # as `hpchub` does: the ledger beside the hub's database
            config.BatchSpawner.ledger_url = "sqlite:///" + os.path.join(app.data_dir, "hpchub_ledger.sqlite")
        spawner = _build(spawner_class, config)
        if isinstance(spawner, BatchSpawner):
            spawner.catalog  # noqa: B018 - parses BatchSpawner.clusters/profiles, raising what is wrong
        authenticator = _build(authenticator_class, config) if issubclass(authenticator_class, LDAPAuthenticator) \
            else None
        proxy = _build(ConfigurableHTTPProxy, config)
    except (TraitError, ValueError, ImportError) as err:
        raise ValueError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a class that fails to build with this configuration: report it
        raise ValueError(f"{type(err).__name__} while setting up the hub's classes with this configuration: {err}") \
            from None
    users = sorted(set(config.Authenticator.get("allowed_users", ())) | set(config.Authenticator.get("admin_users", ())))
    return Settings(spawner=spawner, authenticator_class=authenticator_class, authenticator=authenticator,
                    db_url=app.db_url, ledger_url=spawner.ledger_url if isinstance(spawner, BatchSpawner) else None,
                    proxy_command=list(proxy.command) if proxy.should_start else None, users=users)


def _build(cls: type, config: Config) -> Any:
    """`cls(config=config)`; a failure names the setting that caused it (a validator's own message may not)."""
    try:
        return cls(config=config)
    except Exception as err:  # noqa: BLE001 - which setting is found below, then the error goes on
        for section in [c.__name__ for c in cls.__mro__]:
            for key, value in (config[section].items() if section in config else ()):
                alone = Config()
                alone[section][key] = value
                try:
                    cls(config=alone)
                except Exception:  # noqa: BLE001
                    raise ValueError(f"{section}.{key} = {value!r}: {err}") from None
        raise


# --- the scheduler and its runner ---------------------------------------------------------------------------------

def scheduler_programs(adapter: Adapter) -> dict[str, str]:
    """The programs the adapter runs for its outer methods, from its own argv builders: role -> program."""
    sample = JobRequest(name="hpchub-doctor", tag="hpchub-doctor")
    sample_id = "1"
    return {"submit": adapter.submit_argv(sample)[0], "query": adapter.query_argv([sample_id])[0],
            "cancel": adapter.cancel_argv([sample_id])[0]}


async def check_runner(runner: Runner) -> Check:
    """The runner runs a command at all (for SSH: connects, with the submit host's key as known_hosts says)."""
    try:
        result = await runner.run(["true"], timeout=COMMAND_TIMEOUT)
    except (SchedulerError, ValueError) as err:
        fix = "check the runner's settings"
        if "host key" in str(err).lower() or "known_hosts" in str(err).lower():
            fix = ("the submit host's key is not the one in known_hosts: get the right key from the host's admin "
                   "(ssh-keyscan, checked out of band) and put it in the runner's known_hosts file")
        return Check("runner", FAIL, f"{_runner_name(runner)} cannot run commands: {err}", fix)
    if result.returncode != 0:
        return Check("runner", FAIL, f"{_runner_name(runner)}: `true` exited {result.returncode}: {result.stderr.strip()}",
                     "check the runner's host and account")
    return Check("runner", OK, f"{_runner_name(runner)} runs commands ({result.duration_s * 1000:.0f} ms)")


def _runner_name(runner: Runner) -> str:
    host = getattr(runner, "host", None)
    return f"{type(runner).__name__}" + (f" to {host}" if host else "")


async def check_programs(adapter: Adapter) -> Check:
    """Each scheduler command is found where the runner runs it (its PATH, or the absolute path configured)."""
    missing, found = [], []
    for role, program in scheduler_programs(adapter).items():
        try:
            result = await adapter.runner.run(["which", program], timeout=COMMAND_TIMEOUT)
        except SchedulerError as err:
            missing.append(f"{program} ({role}): {err}")
            continue
        if result.returncode == 0 and result.stdout.strip():
            found.append(result.stdout.strip().splitlines()[0])
        else:
            missing.append(f"{program} ({role})")
    path = getattr(adapter.runner, "path", None)
    if missing:
        where = f" on the runner's PATH ({path})" if path else ""
        return Check("scheduler commands", FAIL, f"{adapter.name}: not found{where}: {', '.join(missing)}",
                     "install the scheduler's client commands on this host (or the submit host), or point the "
                     "spawner at them (PBSSpawner.pbs_exec for PBS); sudo's secure_path must hold them too")
    return Check("scheduler commands", OK, f"{adapter.name}: {', '.join(found)}")


async def check_scheduler_answers(adapter: Adapter) -> Check:
    """The scheduler answers a real question: its partitions (or, where the adapter lists none, a job query)."""
    try:
        partitions = await adapter.partitions()
    except NotImplementedError:
        status = (await adapter.query(["1"]))["1"]
        if status.reason.startswith("scheduler unavailable") or status.reason.startswith("query failed"):
            return Check("scheduler", FAIL, f"{adapter.name} does not answer: {status.reason}",
                         "start the scheduler, or check that this host may talk to it")
        return Check("scheduler", OK, f"{adapter.name} answers")
    except SchedulerError as err:
        fix = ("install its commands (above)" if "cannot run" in str(err) else
               "start the scheduler's controller, or check that this host may talk to it (its configuration, munge or "
               "the network)")
        return Check("scheduler", FAIL, f"{adapter.name} does not answer: {err}", fix)
    names = ", ".join(p.name + ("*" if p.default else "") + ("" if p.state == "up" else f" ({p.state})")
                      for p in partitions)
    return Check("scheduler", OK, f"{adapter.name} answers: partitions {names or '(none)'}")


async def check_sudo(user: str, programs: Sequence[str], runner: Runner | None = None) -> Check:
    """`sudo -n -l -u USER -- PROGRAM` for each program run as the user, where the runner runs it (this host, or the
    submit host as the SSH account): sudo lets that account run it, without a password, and finds it on its
    secure_path."""
    runner = runner or LocalRunner()
    local = isinstance(runner, LocalRunner)
    account = pwd.getpwuid(os.geteuid()).pw_name if local else getattr(runner, "username", "the runner's account")
    if local:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return Check(f"sudo as {user}", FAIL, f"no Unix account {user} on this host",
                         "users' jobs run as their own accounts: they must exist here (NSS, e.g. through LDAP/SSSD)")
    refused, absent = [], []
    for program in programs:
        try:
            result = await runner.run(["sudo", "-n", "-l", "-u", user, "--", program], timeout=COMMAND_TIMEOUT)
        except SchedulerError as err:
            if err.result is None:     # runners take sudo's own refusals for their failure: the answer is kept
                return Check(f"sudo as {user}", FAIL, f"cannot run sudo: {err}", "install sudo")
            result = err.result
        answer = (result.stderr or result.stdout).strip()
        if result.returncode != 0 and "command not found" in answer:   # reported by "scheduler commands"
            absent.append(program)
        elif result.returncode != 0:
            refused.append(f"{program}: {answer or 'not allowed'}")
    if refused:
        return Check(f"sudo as {user}", FAIL, f"{account} may not run as {user}: " + "; ".join(refused),
                     f"add a sudoers rule letting {account} run these commands as the users, without a password "
                     "and without keeping its environment (docs/runners.md)")
    allowed = [p for p in programs if p not in absent]
    return Check(f"sudo as {user}", OK, f"{account} may run {', '.join(allowed)} as {user}"
                 + (f" ({', '.join(absent)}: not installed, see above)" if absent else ""))


# --- LDAP ---------------------------------------------------------------------------------------------------------

async def check_ldap(directory_config: Any) -> list[Check]:
    """Each server answers, with TLS as configured, and takes the service account's bind (or an anonymous one
    where there is none); the user search base exists."""
    from hpchub.ldap import Directory, DirectoryError

    checks = []
    account = directory_config.search_dn or "anonymous"
    for url in directory_config.servers:
        directory = Directory(dataclasses.replace(directory_config, servers=(url,)))
        try:
            conn, code, _ = await asyncio.to_thread(directory.connect, directory_config.search_dn,
                                                    directory_config.search_password)
        except DirectoryError as err:
            checks.append(Check(f"ldap {url}", FAIL, f"no answer: {err}",
                                "check the URL, that the server runs and this host reaches it, and TLS (ca_file, "
                                "tls_mode)"))
            continue
        if conn is None:
            what = "invalid credentials" if code == 49 else f"LDAP result {code}"
            checks.append(Check(f"ldap {url}", FAIL, f"the directory refuses the bind as {account} ({what})",
                                "check LDAPAuthenticator.search_bind_dn and search_bind_password" if
                                directory_config.search_dn else "this directory refuses anonymous binds: set "
                                "search_bind_dn and search_bind_password"))
            continue
        detail = f"bound as {account}" + (" with StartTLS" if directory_config.start_tls else "")
        base = directory_config.user_search_base
        if base:
            try:
                await asyncio.to_thread(directory.search, base, "(objectClass=*)", [], scope="BASE", limit=1, conn=conn)
                detail += f"; {base} exists"
            except DirectoryError as err:
                checks.append(Check(f"ldap {url}", FAIL, f"{detail}, but {err}",
                                    "check LDAPAuthenticator.user_search_base"))
                continue
            finally:
                await asyncio.to_thread(conn.unbind)
        else:
            await asyncio.to_thread(conn.unbind)
        checks.append(Check(f"ldap {url}", OK, detail))
    return checks


# --- the tunnel gateway ---------------------------------------------------------------------------------------------

async def check_gateway(ip: str, port: int, address: str, timeout: float = 5.0) -> Check:
    """The port the gateway listens on (reverse mode): a running gateway there answers with an SSH banner at the
    address jobs dial; a free port is listened on briefly, as the hub would, and must be reachable at that address
    (a firewall on this host can close it)."""
    name = f"gateway {address}:{port}"
    listener = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((ip, port))
    except OSError as err:
        listener.close()
        if err.errno != errno.EADDRINUSE:
            return Check(name, FAIL, f"cannot listen on {ip}:{port}: {err.strerror}",
                         "set BatchSpawner.tunnel_gateway_ip to an address of this host (or 0.0.0.0) and "
                         "tunnel_gateway_port to a port above 1023 unless the hub runs as root")
        banner = await _banner(address, port, timeout)
        if banner.startswith("SSH-"):
            return Check(name, OK, f"the hub's gateway listens ({banner.strip()})")
        return Check(name, FAIL, f"{ip}:{port} is taken by another program ({banner or 'no SSH banner'})",
                     "stop that program or choose another BatchSpawner.tunnel_gateway_port")
    listener.listen(1)
    listener.setblocking(False)
    try:
        reached = await _connects(address, port, timeout)
    finally:
        listener.close()
    if reached:
        return Check(name, FAIL, f"{address}:{port} is closed: {reached}",
                     f"a firewall on this host drops or refuses port {port} (nft list ruleset / iptables -S): open it "
                     "to the compute nodes, or set BatchSpawner.tunnel_gateway_address to an address they reach")
    return Check(name, OK, f"free, and reachable at {address}:{port} (the hub listens there on the first "
                           "reverse-mode spawn)")


async def _connects(host: str, port: int, timeout: float) -> str:
    """"" when a connection to host:port is accepted, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g} s (packets dropped)"
    except OSError as err:
        return err.strerror or str(err)
    writer.close()
    return ""


async def _banner(host: str, port: int, timeout: float) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as err:
        return f"no connection: {err}"
    try:
        return (await asyncio.wait_for(reader.readline(), timeout)).decode(errors="replace")
    except (OSError, asyncio.TimeoutError):
        return ""
    finally:
        writer.close()


# --- the proxy and the databases ----------------------------------------------------------------------------------

async def check_proxy(command: list[str]) -> Check:
    """configurable-http-proxy runs and is recent enough."""
    try:
        result = await LocalRunner(path=os.environ.get("PATH", "") or "/usr/local/bin:/usr/bin:/bin").run(
            [*command, "--version"], timeout=COMMAND_TIMEOUT)
    except SchedulerError as err:
        return Check("proxy", FAIL, f"cannot run {command[0]}: {err}",
                     "install it: npm install -g configurable-http-proxy (Node.js 20 or later)")
    version = result.stdout.strip()
    found = re.match(r"(\d+)\.(\d+)", version)
    if result.returncode != 0 or not found:
        return Check("proxy", FAIL, f"{command[0]} --version: exit {result.returncode} {result.stderr.strip()}",
                     "reinstall configurable-http-proxy")
    if (int(found.group(1)), int(found.group(2))) < CHP_MINIMUM:
        return Check("proxy", WARN, f"configurable-http-proxy {version}: older than "
                     f"{'.'.join(map(str, CHP_MINIMUM))}", "upgrade: npm install -g configurable-http-proxy")
    return Check("proxy", OK, f"configurable-http-proxy {version}")


async def check_database(label: str, url: str) -> Check:
    """Connect and ask `SELECT 1` (the password in the URL never printed)."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError as err:
        return Check(label, FAIL, f"not a database URL: {err}", "see SQLAlchemy's URL format")
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = os.path.abspath(url[len("sqlite:///"):])
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            return Check(label, FAIL, f"{shown}: the directory {directory} does not exist",
                         "create it (the hub's data directory), writable by the hub's account")
        if not os.path.exists(path):    # not created here: the hub makes it, with its own account and mode
            if os.access(directory, os.W_OK):
                return Check(label, OK, f"{shown}: not there yet; the hub creates it in {directory}")
            return Check(label, FAIL, f"{shown}: the hub cannot create it: {directory} is not writable",
                         "make the data directory writable by the hub's account")

    def connect() -> None:
        engine = create_engine(url, pool_pre_ping=True)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()

    try:
        await asyncio.to_thread(connect)
    except (SQLAlchemyError, ImportError) as err:
        message = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        return Check(label, FAIL, f"{shown}: {message}",
                     "check the URL, that the database server runs and takes this account, and its driver "
                     "(pip install hpchub[postgresql] for PostgreSQL)")
    return Check(label, OK, f"{shown} connects")


# --- a test job -----------------------------------------------------------------------------------------------------

async def round_trip(adapter: Adapter, user: str | None, request: JobRequest, template: str,
                   template_dirs: Sequence[str] = (), timeout: float = 300.0) -> Check:
    """Submit a job that prints its node through the spawner's template, as `user`; wait for it to end; report the
    times and its output. Cancelled if it has not ended within `timeout`."""
    name = f"test job as {user or 'the hub'}"
    try:
        script = render_job_script(template, request, user=user or "hub", env_file="/dev/null",
                                   command=["hostname"], template_dirs=template_dirs)
    except TemplateValueError as err:
        return Check(name, FAIL, f"the job script does not render: {err}", "check the spawner's req_* settings")
    started = time.monotonic()
    try:
        job_id = await adapter.submit(script, request, user=user)
    except SchedulerError as err:
        return Check(name, FAIL, f"submit refused: {err}", "the scheduler's reason says which setting to change "
                                                           "(partition, account, walltime, memory)")
    submitted = time.monotonic()
    first_run = None
    status = None
    try:
        while time.monotonic() - started < timeout:
            status = (await adapter.query([job_id]))[job_id]
            if status.state is JobState.RUNNING and first_run is None:
                first_run = time.monotonic()
            if status.state.is_terminal:
                break
            await asyncio.sleep(0.5)
        else:
            await adapter.cancel([job_id], user=user)
            return Check(name, FAIL, f"job {job_id} did not end within {timeout:g} s (last: "
                         f"{status.state.value if status else '?'} {status.reason if status else ''}); cancelled",
                         "the partition may be full or down: see its state, or give --test-job-timeout")
    finally:
        output = await _job_output(adapter, user, (request.output or "").replace("%j", job_id))
    ended = time.monotonic()
    times = (f"submit {submitted - started:.2f} s, queued {((first_run or ended) - submitted):.2f} s, "
             f"total {ended - started:.2f} s")
    if status.state is not JobState.COMPLETED:
        return Check(name, FAIL, f"job {job_id} {status.native_state or status.state.value} "
                     f"(exit code {status.exit_code}, {status.reason}); {times}; output: {output}",
                     "the job's output says why: the admin's set-up lines (req_prologue) run first")
    return Check(name, OK, f"job {job_id} ran on {','.join(status.nodes) or '?'} ({output}); {times}")


async def _job_output(adapter: Adapter, user: str | None, path: str) -> str:
    if not path:
        return ""
    try:
        result = await adapter.runner.run(["tail", "-n", "3", "--", path], user=user, timeout=COMMAND_TIMEOUT)
        await adapter.runner.run(["rm", "-f", "--", path], user=user, timeout=COMMAND_TIMEOUT)
    except SchedulerError as err:
        return f"(cannot read {path}: {err})"
    return " / ".join(result.stdout.strip().splitlines()) or f"(no output in {path})"


def round_trip_request(spawner: Any, cluster: Cluster, user: str) -> JobRequest:
    """A small request in the spawner's (or the cluster's first) partition, account and QOS, with the admin's set-up
    lines, writing to /tmp."""
    from batchspawner.request import parse_walltime_s

    limit = parse_walltime_s(spawner.req_runtime) if spawner.req_runtime else None
    return JobRequest(
        name="hpchub-doctor", tag=f"hpchub-doctor-{uuid.uuid4().hex[:12]}", cores=1,
        walltime_s=min(limit or 120, 120), partition=cluster.partition,
        account=spawner.req_account or None, qos=spawner.req_qos or None,
        reservation=spawner.req_reservation or None, constraint=spawner.req_constraint or None, workdir="/tmp",
        output=f"/tmp/hpchub-doctor-{user}-%j.log", env_setup=tuple(spawner.req_prologue))


# --- all of it ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Cluster:
    """One cluster the hub submits to, as the checks see it."""

    name: str                      # "" when the hub has one cluster (no clusters configured)
    adapter: Adapter
    tunnel: str
    gateway: tuple[str, int, str]  # listen address, port, address jobs dial
    template: str
    template_dirs: tuple[str, ...]
    partition: str | None          # where the test job goes


def clusters_of(spawner: Any) -> list[Cluster]:
    """Every cluster a BatchSpawner may submit to: those of its catalog (BatchSpawner.clusters), else itself."""
    catalog = spawner.catalog
    if catalog is None:
        return [Cluster("", spawner.adapter, spawner.tunnel, (spawner.tunnel_gateway_ip, spawner.tunnel_gateway_port,
                                                              spawner.gateway_address()),
                        spawner.job_template or spawner.adapter.template, tuple(spawner.job_template_dirs),
                        spawner.req_partition or None)]
    found = []
    for spec in catalog.clusters.values():
        adapter = spawner._cluster_adapter(spec)
        host, port = spec.gateway or (spawner.gateway_address(), spawner.tunnel_gateway_port)
        found.append(Cluster(spec.name, adapter, spec.tunnel, (spawner.tunnel_gateway_ip, port, host),
                             spec.job_template or spawner.job_template or adapter.template,
                             tuple(spec.job_template_dirs or spawner.job_template_dirs),
                             next(iter(spec.partitions), None) or spawner.req_partition or None))
    return found


async def run_checks(settings: Settings, *, users: Sequence[str] = (), test_job_user: str | None = None,
                     test_job_timeout: float = 300.0) -> list[Check]:
    from batchspawner import BatchSpawner

    checks = [Check("config", OK, f"spawner {type(settings.spawner).__name__}, authenticator "
                                  f"{settings.authenticator_class.__name__}")]
    spawner = settings.spawner
    steps: list[Callable[[], Awaitable[Check | list[Check]]]] = []
    clusters = clusters_of(spawner) if isinstance(spawner, BatchSpawner) else []
    if not clusters:
        checks.append(Check("scheduler", SKIP, f"{type(spawner).__name__} is not a batch spawner"))
    gateways = set()
    for cluster in clusters:
        steps.append(lambda c=cluster: _cluster_checks(c, list(users) or settings.users[:1], gateways))
    if settings.authenticator is not None:
        directory_config = settings.authenticator.directory.config
        steps.append(lambda: check_ldap(directory_config))
    if settings.proxy_command:
        steps.append(lambda: check_proxy(settings.proxy_command))
    steps.append(lambda: check_database("hub database", settings.db_url))
    if settings.ledger_url:
        steps.append(lambda: check_database("job ledger", settings.ledger_url))
    for step in steps:
        found = await step()
        checks.extend(found if isinstance(found, list) else [found])
    if test_job_user is not None:
        if not clusters:
            checks.append(Check("test job", SKIP, "not a batch spawner"))
        for cluster in clusters:
            run_as = test_job_user if cluster.adapter.runner.switches_user else None
            check = await round_trip(cluster.adapter, run_as, round_trip_request(spawner, cluster, test_job_user),
                                     cluster.template, cluster.template_dirs, test_job_timeout)
            checks.append(_named(check, cluster))
    return checks


async def _cluster_checks(cluster: Cluster, users: list[str], gateways: set) -> list[Check]:
    adapter = cluster.adapter
    checks = [await check_runner(adapter.runner), await check_programs(adapter), await check_scheduler_answers(adapter)]
    if adapter.runner.switches_user:
        programs = scheduler_programs(adapter)
        as_user = [programs["submit"], programs["cancel"], *SPAWNER_FILE_COMMANDS]
        if not users:
            checks.append(Check("sudo", SKIP, "no user to check: give --user NAME (a user whose jobs will run)"))
        for user in users:
            checks.append(await check_sudo(user, as_user, adapter.runner))
    if cluster.tunnel == "reverse" and cluster.gateway not in gateways:   # clusters may share the hub's gateway
        gateways.add(cluster.gateway)
        checks.append(await check_gateway(*cluster.gateway))
    return [_named(check, cluster) for check in checks]


def _named(check: Check, cluster: Cluster) -> Check:
    return dataclasses.replace(check, name=f"{check.name} [{cluster.name}]") if cluster.name else check


def show(console: Console, checks: list[Check]) -> None:
    table = Table(header_style="bold", box=None, padding=(0, 2, 0, 0))
    for column in ("check", "", "what was found"):
        table.add_column(column, overflow="fold")
    styles = {OK: "green", FAIL: "bold red", WARN: "yellow", SKIP: "dim"}
    for check in checks:
        table.add_row(Text(check.name), Text(check.status, style=styles[check.status]), Text(check.detail))
    console.print(table)
    problems = [c for c in checks if c.status in (FAIL, WARN) and c.fix]
    for check in problems:
        console.print(Text(f"{check.name}: {check.fix}", style="red" if check.failed else "yellow"))
    failed = sum(c.failed for c in checks)
    console.print(Text(f"{failed} check(s) failed" if failed else "every check passed",
                       style="bold red" if failed else "bold green"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpchub doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--config-file", dest="config_file",
                        help="jupyterhub_config.py to check (default: ./jupyterhub_config.py when there is one)")
    parser.add_argument("--config", dest="toml", metavar="TOML", help="hpchub's TOML configuration to check")
    parser.add_argument("--user", action="append", default=[], metavar="NAME",
                        help="a user whose jobs will run, for the sudo checks (repeatable; default: the first of the "
                             "configuration's allowed/admin users)")
    parser.add_argument("--test-job", metavar="USER", help="also submit a tiny job as USER and wait for it to end")
    parser.add_argument("--test-job-timeout", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    config_file = args.config_file or ("jupyterhub_config.py" if os.path.isfile("jupyterhub_config.py") else None)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    try:
        settings = settings_from_config(load_config(config_file, args.toml))
    except ValueError as err:
        checks = [Check("config", FAIL, str(err), "correct the setting named (hpchub --help-all lists every option)")]
    else:
        checks = asyncio.run(run_checks(settings, users=args.user, test_job_user=args.test_job,
                                        test_job_timeout=args.test_job_timeout))
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        show(console, checks)
    return 1 if any(c.failed for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
