"""Clusters and profiles: the admin's description of what users may run, validated from plain dicts (what
TOML gives: `BatchSpawner.clusters` and `BatchSpawner.profiles`).

Pure: no I/O, no JupyterHub. Every problem names the source, the dotted key
(`clusters.hpc.partitions.gpu.max_walltime`), the bad value and what is allowed; all problems of a
configuration are reported together (`ConfigError.problems`).
"""
from __future__ import annotations

import difflib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .request import parse_memory_mb, parse_walltime_s

SCHEDULERS = ("slurm", "sge", "pbs", "local")
RUNNERS = ("auto", "local", "sudo", "ssh")
TUNNEL_MODES = ("direct", "reverse")
SCHEDULER_NAMES = {"slurm": "Slurm", "sge": "Grid Engine", "pbs": "PBS", "local": "the local batch system"}

# the characters JobRequest accepts in names (partition, account, ...): nothing that could end a directive
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
NAME_ALLOWED = "letters, digits and _.+- , starting with a letter or digit"
SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SLUG_ALLOWED = "lower-case letters, digits, _ and -, starting with a letter or digit, at most 63 characters"
# anything that could start a new line or hide text in a terminal or a job script
CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


@dataclass(frozen=True)
class FieldSpec:
    """A field of a job request that a profile sets and a user may be allowed to change."""

    name: str       # the user option and TOML key
    request: str    # the JobRequest keyword
    kind: str       # "count", "memory", "walltime" or "name"
    floor: int = 0  # the least value a count, memory (MB) or walltime (s) may take

    @property
    def numeric(self) -> bool:
        return self.kind != "name"


FIELDS: dict[str, FieldSpec] = {spec.name: spec for spec in (
    FieldSpec("partition", "partition", "name"),
    FieldSpec("cores", "cores", "count", 1),
    FieldSpec("memory", "memory_mb", "memory", 1),
    FieldSpec("gpus", "gpus", "count", 0),
    FieldSpec("gpu_type", "gpu_type", "name"),
    FieldSpec("nodes", "nodes", "count", 1),
    FieldSpec("walltime", "walltime_s", "walltime", 1),
    FieldSpec("account", "account", "name"),
    FieldSpec("qos", "qos", "name"),
    FieldSpec("parallel_environment", "parallel_environment", "name"),
)}
NUMERIC = tuple(name for name, spec in FIELDS.items() if spec.numeric)

# What each scheduler's job template uses: a profile cannot set, nor a user choose, anything else.
SCHEDULER_FIELDS: dict[str, tuple[str, ...]] = {
    "slurm": ("partition", "cores", "memory", "gpus", "gpu_type", "nodes", "walltime", "account", "qos"),
    "sge": ("partition", "cores", "memory", "gpus", "nodes", "walltime", "account", "parallel_environment"),
    "pbs": ("partition", "cores", "memory", "gpus", "nodes", "walltime", "account"),
    "local": ("walltime",),
}

# Each scheduler's own words for the fields, as the form shows them.
TERMS: dict[str, dict[str, str]] = {
    "slurm": {"partition": "Partition", "account": "Account", "qos": "QOS", "cores": "CPU cores"},
    "sge": {"partition": "Queue", "account": "Project", "parallel_environment": "Parallel environment",
            "cores": "Slots (cores)"},
    "pbs": {"partition": "Queue", "account": "Account", "cores": "CPUs (ncpus)"},
    "local": {},
}
LABELS = {"partition": "Partition", "cores": "CPU cores", "memory": "Memory", "gpus": "GPUs",
          "gpu_type": "GPU type", "nodes": "Nodes", "walltime": "Run time", "account": "Account", "qos": "QOS",
          "parallel_environment": "Parallel environment"}


def label(scheduler: str, field_name: str) -> str:
    """How `scheduler` names a field ("Queue" on Grid Engine and PBS, "Partition" on Slurm)."""
    return TERMS.get(scheduler, {}).get(field_name) or LABELS[field_name]


# --- values -------------------------------------------------------------------------------------

def show(value: Any) -> str:
    """A value as a person would write it in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def choices(values: Iterable[Any]) -> str:
    return ", ".join(show(v) for v in values) or "(none)"


def format_value(spec: FieldSpec, value: int | str | None) -> str:
    """A field's value in the form a person types it back: '4G', '01:30:00', '2', 'debug'; '' for None."""
    if value is None:
        return ""
    if spec.kind == "memory":
        return f"{value // 1024}G" if value % 1024 == 0 else f"{value}M"
    if spec.kind == "walltime":
        days, rest = divmod(int(value), 86400)
        clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        return f"{days}-{clock}" if days else clock
    return str(value)


def parse_value(spec: FieldSpec, value: Any) -> int | str:
    """One field's value from TOML or a user: counts as int or digits; memory as '4G' or an int of MB;
    walltime in Slurm's forms or an int of minutes (as Slurm reads a bare number); names as text.
    ValueError (message, allowed) otherwise; a bool is never a number."""
    if spec.kind == "name":
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {_type_name(value)}", NAME_ALLOWED)
        if not NAME.fullmatch(value):
            raise ValueError("not a valid name", NAME_ALLOWED)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a whole number or text, got {_type_name(value)}", _NUMBER_FORMS[spec.kind])
    text = str(value).strip()
    if spec.kind == "count":
        if not (text.isascii() and text.isdigit()):     # isdigit alone takes '¹', which int() refuses
            raise ValueError("not a whole number", _NUMBER_FORMS["count"])
        number = int(text)
    else:
        parse = parse_memory_mb if spec.kind == "memory" else parse_walltime_s
        try:
            number = parse(text)
        except ValueError as err:
            message = str(err)
            for prefix in (f"{text!r} is ", f"{text!r}: "):
                message = message[len(prefix):] if message.startswith(prefix) else message
            raise ValueError(message, _NUMBER_FORMS[spec.kind]) from None
        if number is None:
            raise ValueError("empty", _NUMBER_FORMS[spec.kind])
    if number < spec.floor:
        raise ValueError(f"less than {format_value(spec, spec.floor)}", f"at least {format_value(spec, spec.floor)}")
    return number


_NUMBER_FORMS = {
    "count": "a whole number",
    "memory": "a size such as 512M, 4G, 1.5T (a bare number is MB)",
    "walltime": "a run time such as 01:30:00, 2-00:00:00 or 90 (minutes)",
}


def _type_name(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a decimal number", str: "text", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


# --- problems -------------------------------------------------------------------------------------

_MISSING = object()


@dataclass(frozen=True)
class Problem:
    source: str
    key: str
    message: str
    value: Any = _MISSING
    allowed: str = ""

    def __str__(self) -> str:
        shown = "" if self.value is _MISSING else f" = {show(self.value)}"
        allowed = f" (allowed: {self.allowed})" if self.allowed else ""
        return f"{self.source}: {self.key}{shown}: {self.message}{allowed}"


class ConfigError(ValueError):
    """The configuration cannot be used; `problems` lists every problem found, each naming its key."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Reader:
    """Reads plain dicts key by key, collecting problems instead of stopping at the first.

    A getter returns the converted value, or `default` after recording the problem; `check()` raises
    ConfigError with every problem recorded."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str, value: Any = _MISSING, allowed: str = "") -> None:
        self.problems.append(Problem(self.source, key, message, value, allowed))

    def check(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)

    def table(self, data: Mapping, key: str, known: Sequence[str]) -> dict:
        """`data` as a table with only `known` keys: each other key is a problem, with a did-you-mean."""
        if not isinstance(data, Mapping):
            self.problem(key, f"expected a table, got {_type_name(data)}", data)
            return {}
        for name in data:
            if name not in known:
                self.unknown(f"{key}.{name}" if key else str(name), str(name), known)
        return {k: v for k, v in data.items() if k in known}

    def unknown(self, key: str, name: str, known: Sequence[str]) -> None:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = f"; did you mean {show(close[0])}?" if close else ""
        self.problem(key, f"unknown key{hint}", allowed=", ".join(known))

    def get(self, data: Mapping, key: str, name: str, convert: Callable[[Any], Any], default: Any = None, *,
            required: bool = False, allowed: str = "", secret: bool = False) -> Any:
        """`data[name]` through `convert` (which raises ValueError(message[, allowed])). A `secret` value
        (a URL that may hold a password) is not repeated in the problem."""
        dotted = f"{key}.{name}" if key else name
        if name not in data:
            if required:
                self.problem(dotted, "missing", allowed=allowed)
            return default
        try:
            return convert(data[name])
        except ValueError as err:
            message, *rest = err.args or ("invalid",)
            self.problem(dotted, str(message), _MISSING if secret else data[name], rest[0] if rest else allowed)
            return default


# converters: plain TOML value -> model value, ValueError(message, allowed) otherwise

def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_type_name(value)}", "text in quotes")
    if CONTROL.search(value):
        raise ValueError("contains a line break or control character", "one line of text")
    return value


def line_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {_type_name(value)}", 'a list of text, e.g. ["a", "b"]')
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a list of text, found {show(item)}", 'a list of text, e.g. ["a", "b"]')
        if CONTROL.search(item):
            raise ValueError(f"{show(item)} contains a line break or control character", "one line per entry")
    return tuple(value)


def name_list(value: Any) -> tuple[str, ...]:
    items = line_list(value)
    for item in items:
        if not NAME.fullmatch(item):
            raise ValueError(f"{show(item)} is not a valid name", NAME_ALLOWED)
    return items


def one_of(options: Sequence[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.5)
            raise ValueError("not one of the choices" + (f"; did you mean {show(close[0])}?" if close else ""),
                             choices(options))
        return value
    return convert


def whole(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {_type_name(value)}", _range(minimum, maximum))
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError("out of range", _range(minimum, maximum))
        return value
    return convert


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError("expected a number of seconds above 0", "a number above 0, e.g. 30")
    return float(value)


def absolute_path(value: Any) -> str:
    path = text(value)
    if not path.startswith("/"):
        raise ValueError("not an absolute path", "a path starting with /")
    return path


def _range(minimum: int, maximum: int | None) -> str:
    return f"{minimum} to {maximum}" if maximum is not None else f"a whole number >= {minimum}"


def name_value(value: Any) -> str:
    """A scheduler's name for something (queue, reservation, ClusterName): what JobRequest takes in a name."""
    return str(parse_value(FIELDS["partition"], value))


def field_value(spec: FieldSpec) -> Callable[[Any], int | str]:
    return lambda value: parse_value(spec, value)


# --- the models -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bound:
    """An inclusive range of a numeric field, in the request's units (MB, seconds); None = open."""

    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class PartitionPolicy:
    """The admin's caps on one partition (queue), combined with its live limits by taking the stricter.

    Per job: walltime (s), nodes; per node: cores, memory (MB), GPUs. Empty lists allow everything the
    scheduler allows."""

    name: str
    max_walltime_s: int | None = None
    max_cores: int | None = None
    max_memory_mb: int | None = None
    max_gpus: int | None = None
    gpu_types: tuple[str, ...] = ()
    max_nodes: int | None = None
    accounts: tuple[str, ...] = ()
    qos: tuple[str, ...] = ()
    parallel_environments: tuple[str, ...] = ()

    def cap(self, field_name: str) -> int | None:
        return {"walltime": self.max_walltime_s, "cores": self.max_cores, "memory": self.max_memory_mb,
                "gpus": self.max_gpus, "nodes": self.max_nodes}.get(field_name)

    def allowed(self, field_name: str) -> tuple[str, ...]:
        """The values the admin allows for a name field; () = no restriction."""
        return {"gpu_type": self.gpu_types, "account": self.accounts, "qos": self.qos,
                "parallel_environment": self.parallel_environments}.get(field_name, ())


@dataclass(frozen=True)
class SSHSpec:
    """Where the SSH runner logs in: a service account on a submit host, the host key checked."""

    host: str
    user: str
    known_hosts: str
    client_keys: tuple[str, ...]
    port: int = 22


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    display_name: str
    scheduler: str
    runner: str = "auto"
    ssh: SSHSpec | None = None
    #: "direct": the hub connects to the server on the node; "reverse": the job dials the tunnel gateway
    tunnel: str = "direct"
    #: (host, port) of the tunnel gateway as the jobs dial it (reverse mode)
    gateway: tuple[str, int] | None = None
    job_template: str = ""
    job_template_dirs: tuple[str, ...] = ()
    #: PBS_EXEC of the site; None: find qsub, qstat, qdel on the runner's PATH
    pbs_exec: str | None = "/opt/pbs"
    #: the local batch system's spool directory; "" for the spawner's default
    spool_dir: str = ""
    #: Grid Engine: the queue of jobs that name none (the -q of the cluster's sge_request)
    default_queue: str | None = None
    #: Grid Engine: the consumable complex that counts GPUs
    gpu_complex: str = "gpu"
    #: Slurm: the ClusterName whose associations apply, where one slurmdbd serves several clusters
    slurm_cluster: str | None = None
    command_timeout: float = 30.0
    #: the partitions (queues) offered, in order, with the admin's caps; empty: every partition the
    #: scheduler reports, with no caps but its own
    partitions: Mapping[str, PartitionPolicy] = field(default_factory=dict)

    def policy(self, partition: str | None) -> PartitionPolicy:
        return self.partitions.get(partition or "") or PartitionPolicy(partition or "")

    @property
    def fields(self) -> tuple[str, ...]:
        """The request fields this cluster's scheduler uses."""
        return SCHEDULER_FIELDS[self.scheduler]

    def adapter_kwargs(self) -> dict[str, Any]:
        """The scheduler-specific keyword arguments of this cluster's adapter (besides runner and
        command_timeout)."""
        if self.scheduler == "pbs":
            return {"pbs_exec": self.pbs_exec}
        if self.scheduler == "sge":
            return {"default_queue": self.default_queue, "gpu_complex": self.gpu_complex}
        if self.scheduler == "slurm":
            return {"cluster": self.slurm_cluster}
        return {"spool_dir": self.spool_dir} if self.spool_dir else {}


@dataclass(frozen=True)
class Profile:
    """A named set of resources a user can pick, on one cluster.

    `defaults` and `bounds` are in the request's units (MB, seconds). `env_setup`, `command_prefix`,
    `extra_directives`, `reservation` and `constraint` are the admin's and never come from a user."""

    name: str
    display_name: str
    cluster: ClusterSpec
    description: str = ""
    #: the partitions a user may pick from; empty: all the cluster offers
    partitions: tuple[str, ...] = ()
    defaults: Mapping[str, int | str] = field(default_factory=dict)
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    user_editable: tuple[str, ...] = ()
    #: groups whose members see and may use the profile; empty: everyone
    groups: tuple[str, ...] = ()
    env_setup: tuple[str, ...] = ()
    #: argv words in front of the server command, e.g. ("apptainer", "exec", "image.sif")
    command_prefix: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()
    reservation: str | None = None
    constraint: str | None = None

    def visible_to(self, user_groups: Iterable[str]) -> bool:
        """Group names compare without regard to case, as LDAP does."""
        if not self.groups:
            return True
        theirs = {g.casefold() for g in user_groups}
        return any(g.casefold() in theirs for g in self.groups)

    def offered_partitions(self) -> tuple[str, ...]:
        """The configured partitions this profile may use (before the scheduler's live list)."""
        return self.partitions or tuple(self.cluster.partitions)


@dataclass(frozen=True)
class Catalog:
    clusters: Mapping[str, ClusterSpec]
    profiles: tuple[Profile, ...]


# --- parsing ---------------------------------------------------------------------------------------

CLUSTER_KEYS = ("display_name", "scheduler", "runner", "ssh", "tunnel", "job_template", "job_template_dirs",
                "pbs_exec", "spool_dir", "default_queue", "gpu_complex", "slurm_cluster", "command_timeout",
                "partitions")
# keys that only one scheduler uses
SCHEDULER_KEYS = {"pbs_exec": "pbs", "spool_dir": "local", "default_queue": "sge", "gpu_complex": "sge",
                  "slurm_cluster": "slurm"}
SSH_KEYS = ("host", "port", "user", "known_hosts", "client_keys")
TUNNEL_KEYS = ("mode", "gateway")
POLICY_KEYS = ("max_walltime", "max_cores", "max_memory", "max_gpus", "gpu_types", "max_nodes", "accounts", "qos",
               "parallel_environments")
PROFILE_KEYS = ("name", "display_name", "description", "cluster", "partitions", "defaults", "bounds",
                "user_editable", "groups", "env_setup", "modules", "conda_env", "apptainer", "extra_directives",
                "reservation", "constraint", "shared_folders")
SHARED_FOLDER_KEYS = ("path", "name", "read_only")
#: where shared folders appear in the user's JupyterLab (relative to the server's root, the home directory)
SHARED_DIR = "shared"
APPTAINER_KEYS = ("image", "options", "command")
BOUND_KEYS = ("min", "max")
# the policy key capping each numeric field, and the field each name list restricts
_POLICY_CAPS = {"max_walltime": "walltime", "max_cores": "cores", "max_memory": "memory", "max_gpus": "gpus",
                "max_nodes": "nodes"}
_POLICY_LISTS = {"gpu_types": "gpu_type", "accounts": "account", "qos": "qos",
                 "parallel_environments": "parallel_environment"}
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def parse_catalog(clusters: Mapping[str, Any], profiles: Sequence[Mapping[str, Any]], *, source: str) -> Catalog:
    """Clusters (name -> table) and profiles (tables with a "name", in display order) -> a Catalog, or
    ConfigError listing every problem. Keys in messages are as in the TOML file: `clusters.NAME.KEY`,
    `profiles.NAME.KEY`."""
    reader = Reader(source)
    parsed: dict[str, ClusterSpec] = {}
    if not isinstance(clusters, Mapping):
        reader.problem("clusters", f"expected a table of clusters, got {_type_name(clusters)}")
        clusters = {}
    for name, table in clusters.items():
        cluster = _cluster(reader, str(name), table)
        if cluster is not None:
            parsed[cluster.name] = cluster
    if not isinstance(profiles, Sequence) or isinstance(profiles, str):
        reader.problem("profiles", f"expected a list of profiles, got {_type_name(profiles)}")
        profiles = []
    result: list[Profile] = []
    seen: set[str] = set()
    for index, table in enumerate(profiles):
        name = table.get("name") if isinstance(table, Mapping) else None
        key = f"profiles.{name}" if isinstance(name, str) and SLUG.fullmatch(name) else f"profiles[{index}]"
        if isinstance(name, str) and name in seen:
            reader.problem(f"{key}.name", "a second profile with this name", name)
            continue
        seen.add(str(name))
        profile = _profile(reader, key, table, parsed, clusters)
        if profile is not None:
            result.append(profile)
    if profiles and not clusters:
        reader.problem("clusters", "profiles need at least one cluster: add a [clusters.NAME] table")
    reader.check()
    return Catalog(parsed, tuple(result))


def _cluster(reader: Reader, name: str, table: Any) -> ClusterSpec | None:
    key = f"clusters.{name}"
    before = len(reader.problems)
    if not SLUG.fullmatch(name):
        reader.problem(key, "not a valid cluster name", name, SLUG_ALLOWED)
    data = reader.table(table, key, CLUSTER_KEYS)
    scheduler = reader.get(data, key, "scheduler", one_of(SCHEDULERS), required=True, allowed=choices(SCHEDULERS))
    runner = reader.get(data, key, "runner", one_of(RUNNERS), "auto")
    ssh = None
    if runner == "ssh":
        if "ssh" not in data:
            reader.problem(f"{key}.ssh", 'missing: runner = "ssh" needs a [' + key + '.ssh] table with host, user, '
                           "known_hosts and client_keys")
        else:
            ssh = _ssh(reader, f"{key}.ssh", data["ssh"])
    elif "ssh" in data:
        reader.problem(f"{key}.ssh", f'only used with runner = "ssh" (this cluster\'s runner is {show(runner)})')
    tunnel, gateway = _tunnel(reader, f"{key}.tunnel", data.get("tunnel", {}))
    for option, only in SCHEDULER_KEYS.items():
        if option in data and scheduler is not None and scheduler != only:
            reader.problem(f"{key}.{option}", f"only used with scheduler = {show(only)}", data[option])
    pbs_exec = reader.get(data, key, "pbs_exec", _pbs_exec, "/opt/pbs")
    partitions: dict[str, PartitionPolicy] = {}
    declared = data.get("partitions", {})
    if not isinstance(declared, Mapping):
        reader.problem(f"{key}.partitions", f"expected a table of partitions, got {_type_name(declared)}", declared)
        declared = {}
    for partition_name, policy_table in declared.items():
        policy = _policy(reader, f"{key}.partitions.{partition_name}", str(partition_name), policy_table, scheduler)
        if policy is not None:
            partitions[policy.name] = policy
    if scheduler == "local" and partitions:
        reader.problem(f"{key}.partitions", "the local batch system has no partitions")
    default_queue = reader.get(data, key, "default_queue", name_value)
    if default_queue is not None and partitions and default_queue not in partitions:
        reader.problem(f"{key}.default_queue", "not one of the cluster's queues", default_queue, choices(partitions))
    cluster = ClusterSpec(
        name=name,
        display_name=reader.get(data, key, "display_name", text, name),
        scheduler=scheduler or "slurm",
        runner=runner or "auto",
        ssh=ssh,
        tunnel=tunnel,
        gateway=gateway,
        job_template=reader.get(data, key, "job_template", _template_name, ""),
        job_template_dirs=reader.get(data, key, "job_template_dirs", _path_list, ()),
        pbs_exec=pbs_exec or None,
        spool_dir=reader.get(data, key, "spool_dir", absolute_path, ""),
        default_queue=default_queue,
        gpu_complex=reader.get(data, key, "gpu_complex", name_value, "gpu"),
        slurm_cluster=reader.get(data, key, "slurm_cluster", name_value),
        command_timeout=reader.get(data, key, "command_timeout", seconds, 30.0),
        partitions=partitions,
    )
    return cluster if len(reader.problems) == before else None


def _pbs_exec(value: Any) -> str:
    """PBS_EXEC, or "" for the runner's PATH."""
    return absolute_path(value) if value != "" else ""


def _template_name(value: Any) -> str:
    name = text(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+\.j2", name) or ".." in name:
        raise ValueError("not a template file name", "a file name ending in .j2, e.g. slurm.sh.j2, found in "
                         "job_template_dirs or the packaged templates")
    return name


def _path_list(value: Any) -> tuple[str, ...]:
    paths = line_list(value)
    for path in paths:
        if not path.startswith("/"):
            raise ValueError(f"{show(path)} is not an absolute path", "paths starting with /")
    return paths


def _ssh(reader: Reader, key: str, table: Any) -> SSHSpec | None:
    before = len(reader.problems)
    data = reader.table(table, key, SSH_KEYS)
    spec = SSHSpec(
        host=reader.get(data, key, "host", _host, "", required=True, allowed="a host name or address"),
        user=reader.get(data, key, "user", _user, "", required=True, allowed="the service account's user name"),
        known_hosts=reader.get(data, key, "known_hosts", absolute_path, "", required=True,
                               allowed="the path of a known_hosts file holding the submit host's key"),
        client_keys=reader.get(data, key, "client_keys", _key_paths, (), required=True,
                               allowed="a list of private key files, e.g. [\"/etc/hpchub/ssh/id_ed25519\"]"),
        port=reader.get(data, key, "port", whole(1, 65535), 22),
    )
    return spec if len(reader.problems) == before else None


def _host(value: Any) -> str:
    host = text(value)
    if not _HOST.fullmatch(host):
        raise ValueError("not a host name or address", "a host name, an IPv4 address or [IPv6]")
    return host


def _user(value: Any) -> str:
    user = text(value)
    if not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", user):
        raise ValueError("not a valid user name", "a POSIX user name")
    return user


def _key_paths(value: Any) -> tuple[str, ...]:
    paths = _path_list(value)
    if not paths:
        raise ValueError("empty", "at least one private key file")
    return paths


def _tunnel(reader: Reader, key: str, table: Any) -> tuple[str, tuple[str, int] | None]:
    data = reader.table(table, key, TUNNEL_KEYS)
    mode = reader.get(data, key, "mode", one_of(TUNNEL_MODES), "direct")
    gateway = reader.get(data, key, "gateway", _address, None)
    if mode == "reverse" and gateway is None and "gateway" not in data:
        reader.problem(f"{key}.gateway", 'missing: mode = "reverse" needs the address jobs dial',
                       allowed='"host:port", e.g. "hub.example.org:2222"')
    if mode == "direct" and "gateway" in data:
        reader.problem(f"{key}.gateway", 'only used with mode = "reverse"', data["gateway"])
    return mode or "direct", gateway


def _address(value: Any) -> tuple[str, int]:
    host, sep, port = text(value).rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not host:port", '"host:port", e.g. "hub.example.org:2222"')
    return host.strip("[]"), int(port)


def _policy(reader: Reader, key: str, name: str, table: Any, scheduler: str | None) -> PartitionPolicy | None:
    before = len(reader.problems)
    if not NAME.fullmatch(name):
        reader.problem(key, "not a valid partition name", name, NAME_ALLOWED)
    data = reader.table(table, key, POLICY_KEYS)
    values: dict[str, Any] = {}
    for toml_key, field_name in _POLICY_CAPS.items():
        values[toml_key] = reader.get(data, key, toml_key, field_value(FIELDS[field_name]))
    for toml_key in _POLICY_LISTS:
        values[toml_key] = reader.get(data, key, toml_key, name_list, ())
    if scheduler in SCHEDULER_FIELDS:
        for toml_key, field_name in {**_POLICY_CAPS, **_POLICY_LISTS}.items():
            if toml_key in data and field_name not in SCHEDULER_FIELDS[scheduler]:
                reader.problem(f"{key}.{toml_key}", f"{SCHEDULER_NAMES[scheduler]} jobs have no "
                               f"{LABELS[field_name].lower()}", data[toml_key],
                               f"keys for {scheduler}: " + ", ".join(
                                   k for k, f in {**_POLICY_CAPS, **_POLICY_LISTS}.items()
                                   if f in SCHEDULER_FIELDS[scheduler]))
    if len(reader.problems) != before:
        return None
    return PartitionPolicy(
        name=name, max_walltime_s=values["max_walltime"], max_cores=values["max_cores"],
        max_memory_mb=values["max_memory"], max_gpus=values["max_gpus"], gpu_types=values["gpu_types"],
        max_nodes=values["max_nodes"], accounts=values["accounts"], qos=values["qos"],
        parallel_environments=values["parallel_environments"],
    )


def _profile(reader: Reader, key: str, table: Any, clusters: Mapping[str, ClusterSpec],
             declared: Mapping[str, Any]) -> Profile | None:
    before = len(reader.problems)
    data = reader.table(table, key, PROFILE_KEYS)
    name = reader.get(data, key, "name", _slug, "", required=True, allowed=SLUG_ALLOWED)
    cluster_name = reader.get(data, key, "cluster", text, None)
    if cluster_name is None and "cluster" not in data:
        if len(declared) == 1:
            cluster_name = next(iter(declared))
        elif declared:
            reader.problem(f"{key}.cluster", "missing: there are several clusters", allowed=choices(declared))
    cluster = clusters.get(cluster_name) if cluster_name is not None else None
    if cluster_name is not None and cluster_name not in declared:
        close = difflib.get_close_matches(cluster_name, list(declared), n=1)
        reader.problem(f"{key}.cluster", "no such cluster" + (f"; did you mean {show(close[0])}?" if close else ""),
                       cluster_name, choices(declared) if declared else "add a [clusters.NAME] table")
    if cluster is None:
        # the cluster is unknown or broken (reported there): the rest cannot be checked against it
        return None
    usable = cluster.fields
    partitions = reader.get(data, key, "partitions", name_list, ())
    configured = tuple(cluster.partitions)
    for partition in partitions:
        if configured and partition not in configured:
            reader.problem(f"{key}.partitions", f"cluster {cluster.name!r} offers no partition {partition!r}; add "
                           f"[clusters.{cluster.name}.partitions.{partition}] or remove it here", list(partitions),
                           choices(configured))
    if partitions and "partition" not in usable:
        reader.problem(f"{key}.partitions", f"{SCHEDULER_NAMES[cluster.scheduler]} has no partitions", list(partitions))
    defaults = _defaults(reader, f"{key}.defaults", data.get("defaults", {}), usable)
    bounds = _bounds(reader, f"{key}.bounds", data.get("bounds", {}), usable)
    editable = reader.get(data, key, "user_editable", line_list, ())
    for item in editable:
        if item not in FIELDS:
            close = difflib.get_close_matches(item, list(FIELDS), n=1)
            reader.problem(f"{key}.user_editable", f"{item!r} is not a field" + (
                f"; did you mean {show(close[0])}?" if close else ""), list(editable), ", ".join(usable))
        elif item not in usable:
            reader.problem(f"{key}.user_editable", f"{SCHEDULER_NAMES[cluster.scheduler]} jobs have no "
                           f"{LABELS[item].lower()}", list(editable), ", ".join(usable))
    _check_defaults(reader, key, cluster, partitions or configured, defaults, bounds)
    env_setup = list(reader.get(data, key, "env_setup", line_list, ()))
    env_setup += [f"module load {shlex.quote(module)}" for module in reader.get(data, key, "modules", _words, ())]
    conda_env = reader.get(data, key, "conda_env", _conda_env, None)
    if conda_env:
        env_setup += [
            "set +u  # conda's activation scripts read unset variables",
            'eval "$(conda shell.bash hook)"',
            f"conda activate {shlex.quote(conda_env)}",
            "set -u",
        ]
    folders = _shared_folders(reader, f"{key}.shared_folders", data.get("shared_folders", []))
    env_setup += shared_folder_lines(folders)
    prefix = _apptainer(reader, f"{key}.apptainer", data["apptainer"]) if "apptainer" in data else ()
    profile = Profile(
        name=name,
        display_name=reader.get(data, key, "display_name", text, name),
        description=reader.get(data, key, "description", _paragraph, ""),
        cluster=cluster,
        partitions=partitions,
        defaults=defaults,
        bounds=bounds,
        user_editable=tuple(i for i in editable if i in usable),
        groups=reader.get(data, key, "groups", line_list, ()),
        env_setup=tuple(env_setup),
        command_prefix=prefix,
        extra_directives=reader.get(data, key, "extra_directives", line_list, ()),
        reservation=reader.get(data, key, "reservation", name_value, None),
        constraint=reader.get(data, key, "constraint", _constraint, None),
    )
    return profile if len(reader.problems) == before else None


def _slug(value: Any) -> str:
    name = text(value)
    if not SLUG.fullmatch(name):
        raise ValueError("not a valid profile name", SLUG_ALLOWED)
    return name


def _paragraph(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_type_name(value)}", "text in quotes")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", value):
        raise ValueError("contains a control character", "text (line breaks allowed)")
    return value


def _words(value: Any) -> tuple[str, ...]:
    items = line_list(value)
    for item in items:
        if not item or any(c.isspace() for c in item):
            raise ValueError(f"{show(item)} is empty or holds a space", "one module name per entry")
    return items


def _conda_env(value: Any) -> str:
    env = text(value)
    if not re.fullmatch(r"[A-Za-z0-9_./+-]+", env):
        raise ValueError("not a conda environment name or prefix", "a name or an absolute path of letters, "
                         "digits and _./+-")
    return env


def _constraint(value: Any) -> str:
    constraint = text(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:,&|()\[\]*+-]+", constraint):
        raise ValueError("not a node feature expression", "node features with the operators & | , : * () []")
    return constraint


def _apptainer(reader: Reader, key: str, table: Any) -> tuple[str, ...]:
    data = reader.table(table, key, APPTAINER_KEYS)
    image = reader.get(data, key, "image", _single_word, "", required=True,
                       allowed='an image path or URI, e.g. "/shared/images/jupyter.sif"')
    options = reader.get(data, key, "options", line_list, ())
    command = reader.get(data, key, "command", _single_word, "apptainer")
    return (command, "exec", *options, image) if image else ()


@dataclass(frozen=True)
class SharedFolder:
    """A folder (e.g. course material on a shared filesystem) shown in the user's JupyterLab as
    ~/shared/NAME; with read_only, the job's server refuses writes there (the folder's own permissions
    protect it from the terminal)."""

    path: str
    name: str
    read_only: bool = True


def shared_folder_lines(folders: Sequence[SharedFolder]) -> list[str]:
    """The job's set-up lines: the links, and the read-only ones for the server's guard (hpchub.read_only)."""
    if not folders:
        return []
    lines = [f'mkdir -p "$HOME"/{SHARED_DIR}']
    lines += [f'ln -sfn {shlex.quote(f.path)} "$HOME"/{SHARED_DIR}/{shlex.quote(f.name)}' for f in folders]
    read_only = ":".join(f"{SHARED_DIR}/{f.name}" for f in folders if f.read_only)
    if read_only:
        lines.append(f"export HPCHUB_READ_ONLY_PATHS={shlex.quote(read_only)}")
    return lines


def _shared_folders(reader: Reader, key: str, items: Any) -> tuple[SharedFolder, ...]:
    if not isinstance(items, list):
        reader.problem(key, "expected a list of tables", items, '[{path = "/srv/course", name = "course"}]')
        return ()
    folders: list[SharedFolder] = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            reader.problem(where, "expected a table", item, '{path = "/srv/course", name = "course"}')
            continue
        data = reader.table(item, where, SHARED_FOLDER_KEYS)
        path = reader.get(data, where, "path", absolute_path, None, required=True, allowed="an absolute path")
        name = reader.get(data, where, "name", _folder_name, None, required=True, allowed=SLUG_ALLOWED)
        read_only = reader.get(data, where, "read_only", _flag, True)
        if name in {f.name for f in folders}:
            reader.problem(f"{where}.name", "another shared folder has this name", name, "a name of its own")
        elif path and name:
            folders.append(SharedFolder(path, name, read_only))
    return tuple(folders)


def _folder_name(value: Any) -> str:
    name = text(value)
    if not SLUG.fullmatch(name):
        raise ValueError("not a valid folder name", SLUG_ALLOWED)
    return name


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}", "true or false")
    return value


def _single_word(value: Any) -> str:
    word = text(value)
    if not word or any(c.isspace() for c in word):
        raise ValueError("empty or holds a space", "one word: a path or URI")
    return word


def _defaults(reader: Reader, key: str, table: Any, usable: Sequence[str]) -> dict[str, int | str]:
    data = reader.table(table, key, tuple(FIELDS))
    values: dict[str, int | str] = {}
    for name in data:
        if name not in usable:
            reader.problem(f"{key}.{name}", "this cluster's scheduler has no such setting", data[name],
                           ", ".join(usable))
            continue
        value = reader.get(data, key, name, field_value(FIELDS[name]))
        if value is not None:
            values[name] = value
    return values


def _bounds(reader: Reader, key: str, table: Any, usable: Sequence[str]) -> dict[str, Bound]:
    data = reader.table(table, key, NUMERIC)
    bounds: dict[str, Bound] = {}
    for name, limits in data.items():
        where = f"{key}.{name}"
        if name not in usable:
            reader.problem(where, "this cluster's scheduler has no such setting", allowed=", ".join(
                n for n in usable if n in NUMERIC))
            continue
        pair = reader.table(limits, where, BOUND_KEYS)
        low = reader.get(pair, where, "min", field_value(FIELDS[name]))
        high = reader.get(pair, where, "max", field_value(FIELDS[name]))
        if low is not None and high is not None and low > high:
            reader.problem(f"{where}.min", f"more than max {format_value(FIELDS[name], high)}",
                           pair["min"], f"at most {format_value(FIELDS[name], high)}")
        bounds[name] = Bound(low, high)
    return bounds


def _check_defaults(reader: Reader, key: str, cluster: ClusterSpec, partitions: Sequence[str],
                    defaults: Mapping[str, Any], bounds: Mapping[str, Bound]) -> None:
    """Each default within the profile's bounds and every partition's caps; a bounded memory or walltime
    has a default (else the scheduler's default could lie outside the bounds)."""
    for name, bound in bounds.items():
        spec = FIELDS[name]
        value = defaults.get(name)
        if value is None:
            if spec.kind in ("memory", "walltime"):
                reader.problem(f"{key}.defaults.{name}", f"missing: bounds.{name} is set, so the profile needs a "
                               "default within it", allowed=_bound_text(spec, bound))
            continue
        if (bound.min is not None and value < bound.min) or (bound.max is not None and value > bound.max):
            reader.problem(f"{key}.defaults.{name}", "outside the profile's bounds", _as_written(spec, value),
                           _bound_text(spec, bound))
    partition = defaults.get("partition")
    if partition is not None and partitions and partition not in partitions:
        reader.problem(f"{key}.defaults.partition", "not one of the profile's partitions", partition,
                       choices(partitions))
    for policy_name in ([partition] if partition else partitions):
        policy = cluster.partitions.get(policy_name)
        if policy is None:
            continue
        for name in NUMERIC:
            cap, value = policy.cap(name), defaults.get(name)
            if cap is not None and value is not None and value > cap:
                reader.problem(f"{key}.defaults.{name}", f"above the cap of partition {policy_name!r} "
                               f"(clusters.{cluster.name}.partitions.{policy_name}.max_{name})",
                               _as_written(FIELDS[name], value), f"at most {format_value(FIELDS[name], cap)}")
        for name in _POLICY_LISTS.values():
            allowed, value = policy.allowed(name), defaults.get(name)
            if allowed and value is not None and value not in allowed:
                reader.problem(f"{key}.defaults.{name}", f"not allowed in partition {policy_name!r}", value,
                               choices(allowed))


def _bound_text(spec: FieldSpec, bound: Bound) -> str:
    return range_text(spec, bound.min, bound.max)


def range_text(spec: FieldSpec, low: int | None, high: int | None) -> str:
    """'1 to 8', 'at most 01:00:00', 'at least 1G' or '' (no bound)."""
    low = None if low is None or low <= spec.floor else low
    if low is not None and high is not None:
        return f"{format_value(spec, low)} to {format_value(spec, high)}"
    if high is not None:
        return f"at most {format_value(spec, high)}"
    return f"at least {format_value(spec, low)}" if low is not None else ""


def _as_written(spec: FieldSpec, value: int | str) -> int | str:
    """A parsed value as the admin would write it: counts as numbers, sizes and times as text."""
    return value if spec.kind == "count" else format_value(spec, value)
