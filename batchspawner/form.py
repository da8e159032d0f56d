"""The spawn form and the validation of `user_options`, for the form and the REST API alike.

`render_form` builds the HTML of JupyterHub's `options_form` from the profiles a user may see and the
partitions' live limits; `options_from_form` turns the posted form into `user_options`;
`validate_options` turns any `user_options` (the form's strings or a REST client's JSON) into a `Choice`:
the profile, its cluster and the request fields, each checked against the profile and the partition's
limits. User values reach the HTML only as autoescaped data, and the job script only through JobRequest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from jinja2 import PackageLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from schedulers.base import Associations, InvalidRequest, JobRequest, PartitionInfo
from schedulers.limits import check_request

from .profiles import (CONTROL, FIELDS, NAME_ALLOWED, NUMERIC, SCHEDULER_NAMES, Bound, ClusterSpec, Profile,
                       format_value, label, parse_value, range_text)

#: what a user may send: the profile and the request fields
USER_FIELDS = ("profile", *FIELDS)
#: names a user might try that only the administrator sets
ADMIN_ONLY = ("cluster", "env_setup", "extra_directives", "reservation", "constraint", "job_template", "runner",
              "modules", "conda_env", "apptainer", "command_prefix", "name", "tag", "workdir", "output", "error",
              "cmd", "prologue")
MAX_LENGTH = 200
_REQUEST_FIELD = {"memory_mb": "memory", "walltime_s": "walltime"}
_NAME_FIELDS = ("gpu_type", "account", "qos", "parallel_environment")
# the browser's hint of what the server accepts (never stricter); written for the `v` flag that HTML
# patterns use, where a `-` in a class must be escaped
_HTML_PATTERNS = {"memory": r"[0-9]+(\.[0-9]+)? *[KMGTkmgt]?[Ii]?[Bb]?", "walltime": r"[0-9]+(-[0-9]+)?(:[0-9]+){0,2}",
                  "name": r"[A-Za-z0-9][A-Za-z0-9_.+\-]*"}


class FormError(ValueError):
    """A user option that cannot be accepted; `field` names it (HTTP 400)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class Choice:
    """A validated choice: the profile, its cluster, and the JobRequest keywords (all but name, tag,
    workdir, output and error, which the spawner adds). `options` is the choice as canonical user_options
    (what the form pre-fills next time); `command_prefix` goes in front of the server command."""

    profile: Profile
    cluster: ClusterSpec
    request: Mapping[str, Any]
    command_prefix: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def job_request(self, **names: Any) -> JobRequest:
        """The JobRequest, given name, tag, workdir, output (and error)."""
        return JobRequest(**names, **self.request)


@dataclass(frozen=True)
class Limit:
    """The range a numeric field may take now, and why each end is where it is."""

    low: int
    high: int | None
    low_why: str
    high_why: str = ""

    def hint(self, spec_name: str) -> str:
        return range_text(FIELDS[spec_name], self.low, self.high)


def visible_profiles(profiles: Iterable[Profile], user_groups: Iterable[str]) -> list[Profile]:
    """The profiles the user's groups may see and use, in the configured order."""
    groups = list(user_groups)
    return [p for p in profiles if p.visible_to(groups)]


# --- what a profile allows on a partition now -------------------------------------------------------

def partition_names(profile: Profile, live: Sequence[PartitionInfo] | None) -> tuple[str, ...]:
    """The partitions the user may pick: the profile's (else the cluster's configured ones), of those the
    scheduler reports now; every reported one when neither restricts. () = the scheduler's default only."""
    configured = profile.offered_partitions()
    if live is None:
        return configured
    reported = [p.name for p in live]
    return tuple(n for n in configured if n in reported) if configured else tuple(reported)


def default_partition(profile: Profile, live: Sequence[PartitionInfo] | None) -> str | None:
    if "partition" in profile.defaults:
        return str(profile.defaults["partition"])
    offered = partition_names(profile, live)
    for info in live or ():
        if info.default and (info.name in offered or not offered):
            return info.name
    return offered[0] if offered else None


def partition_info(live: Sequence[PartitionInfo] | None, partition: str | None) -> PartitionInfo | None:
    """The live record of `partition` (None: the scheduler's default partition); None when unknown."""
    for info in live or ():
        if info.name == partition or (partition is None and info.default):
            return info
    return None


def field_limits(profile: Profile, partition: str | None, info: PartitionInfo | None,
                 gpu_type: str | None = None) -> dict[str, Limit]:
    """For each numeric field: the profile's bounds, the admin's caps on the partition and the partition's
    live limits (per node for cores, memory and GPUs), the stricter of each."""
    term = label(profile.cluster.scheduler, "partition").lower()
    name = partition or (info.name if info else None)
    where = f"{term} {name!r}" if name else f"the default {term}"
    policy = profile.cluster.policy(partition)
    limits = {}
    for name in NUMERIC:
        spec, bound = FIELDS[name], profile.bounds.get(name, Bound())
        if bound.min is not None:
            low, low_why = bound.min, f"the least profile {profile.display_name!r} allows"
        else:
            low, low_why = spec.floor, "the least a job can ask for"
        caps = []
        if bound.max is not None:
            caps.append((bound.max, f"the most profile {profile.display_name!r} allows"))
        if policy.cap(name) is not None:
            caps.append((policy.cap(name), f"the administrators' limit in {where}"))
        live_cap = _live_cap(name, info, gpu_type)
        if live_cap is not None:
            caps.append((live_cap, _LIVE_WHY[name].format(where=where)))
        high, high_why = min(caps, key=lambda cap: cap[0]) if caps else (None, "")
        limits[name] = Limit(low, high, low_why, high_why)
    return limits


_LIVE_WHY = {
    "walltime": "the time limit of {where}",
    "cores": "the cores of the largest node in {where}",
    "memory": "the memory of the largest node in {where}",
    "gpus": "the GPUs of the largest node in {where}",
    "nodes": "the node limit of {where}",
}


def _live_cap(name: str, info: PartitionInfo | None, gpu_type: str | None) -> int | None:
    if info is None:
        return None
    if name == "gpus":
        # per type; "" holds the most of any type; no entry: none
        return info.gpus.get(gpu_type or "", 0)
    if name == "nodes":
        # a job asking for more nodes than the partition has would pend for ever
        caps = [cap for cap in (info.max_nodes, info.nodes_total or None) if cap is not None]
        return min(caps) if caps else None
    return {"walltime": info.max_walltime_s, "cores": info.max_cores_per_node,
            "memory": info.max_memory_mb_per_node}[name]


def allowed_names(profile: Profile, partition: str | None, info: PartitionInfo | None,
                  associations: Associations | None) -> dict[str, tuple[str, ...] | None]:
    """For each name field (gpu_type, account, qos, parallel_environment) the values allowed now, or None
    where nothing restricts it (a free, pattern-checked text). Restrictions combine by intersection: the
    admin's list for the partition, the user's associations, what the partition has (its GPU types and
    parallel environments: none listed, none allowed; its accounts: none listed, any)."""
    policy = profile.cluster.policy(partition)
    sources: dict[str, list[Sequence[str] | None]] = {
        "gpu_type": [policy.gpu_types or None, tuple(k for k in info.gpus if k) if info else None],
        "account": [policy.accounts or None, associations.accounts if associations else None,
                    info.allowed_accounts or None if info else None],
        "qos": [policy.qos or None, associations.qos if associations else None],
        "parallel_environment": [policy.parallel_environments or None,
                                 info.parallel_environments if info else None],
    }
    allowed: dict[str, tuple[str, ...] | None] = {}
    for name, lists in sources.items():
        known = [list(values) for values in lists if values is not None]
        allowed[name] = tuple(v for v in known[0] if all(v in other for other in known[1:])) if known else None
    return allowed


def default_value(profile: Profile, name: str) -> int | str | None:
    """A field's value when the user gives none: the profile's default; else one core, one node, no GPU,
    and the scheduler's defaults for the rest (None)."""
    if name in profile.defaults:
        return profile.defaults[name]
    return {"cores": 1, "nodes": 1, "gpus": 0}.get(name)


# --- user options ------------------------------------------------------------------------------------

def options_from_form(formdata: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The posted form (JupyterHub's dict of lists of strings) as user_options: the chosen profile and its
    section's fields (inputs named "PROFILE.FIELD"), strings as posted. Other profiles' sections are
    dropped; any other key is kept, for validate_options to refuse by name."""
    options: dict[str, Any] = {}
    profile = formdata.get("profile")
    chosen = profile[0] if isinstance(profile, (list, tuple)) and len(profile) == 1 else profile
    for key, values in formdata.items():
        if key == "_xsrf":
            continue
        section, dot, name = key.partition(".")
        if dot and section != chosen and isinstance(chosen, str):
            continue
        options[name if dot and section == chosen else key] = (
            values[0] if isinstance(values, (list, tuple)) and len(values) == 1 else values)
    return options


def profile_for(options: Any, profiles: Sequence[Profile], user_groups: Iterable[str]) -> Profile:
    """The profile `options` asks for (the first visible one when it names none). A profile hidden from the
    user's groups gets the same answer as one that does not exist: names of hidden profiles never leak."""
    visible = visible_profiles(profiles, user_groups)
    if not visible:
        raise FormError("profile", "no profile is available to you: ask your administrators for access")
    wanted = options.get("profile") if isinstance(options, Mapping) else None
    if wanted is None or wanted == "":
        return visible[0]
    if not isinstance(wanted, str):
        raise FormError("profile", f"expected the name of a profile, got {_kind(wanted)}")
    _check_text("profile", wanted)
    for profile in visible:
        if profile.name == wanted:
            return profile
    raise FormError("profile", f"{wanted!r} is not a profile you can use (yours: "
                               f"{', '.join(p.name for p in visible)})")


def validate_options(
    options: Any,
    *,
    profiles: Sequence[Profile],
    user_groups: Iterable[str],
    partitions: Mapping[str, Sequence[PartitionInfo]],
    associations: Mapping[str, Associations | None],
) -> Choice:
    """Check `user_options` and turn them into a Choice; FormError naming the field otherwise.

    `partitions` and `associations` are the live partitions and the user's associations per cluster name
    (a cluster missing from them: not known now; only the admin's limits apply). Numbers may be ints or
    strings ("4", "4G", "01:00:00"); an empty string or null means the default. Refused: unknown or
    admin-only fields, wrong types, line breaks and control characters, a profile the user may not use, a
    field the profile does not let the user change set to anything but its default, a value outside the
    profile's bounds or the partition's limits, a name the partition or the user's associations do not
    allow."""
    given = _screen(options)
    profile = profile_for(given, profiles, user_groups)
    given.pop("profile", None)
    cluster = profile.cluster
    for name in given:
        if name not in cluster.fields:
            raise FormError(name, f"{SCHEDULER_NAMES[cluster.scheduler]} jobs on {cluster.display_name} have no "
                                  f"{label(cluster.scheduler, name).lower()} (fields: {', '.join(cluster.fields)})")
    live = partitions.get(cluster.name)
    values: dict[str, Any] = {}
    if "partition" in cluster.fields:
        values["partition"] = _partition(profile, given, live)
    info = partition_info(live, values.get("partition"))
    allowed = allowed_names(profile, values.get("partition"), info, associations.get(cluster.name))
    for name in _NAME_FIELDS:
        if name in cluster.fields:
            values[name] = _named(profile, name, given, allowed[name], values.get("partition"))
    limits = field_limits(profile, values.get("partition"), info, values.get("gpu_type"))
    for name in NUMERIC:
        if name in cluster.fields:
            values[name] = _number(profile, name, given, limits[name])
    request = {FIELDS[name].request: values.get(name) for name in FIELDS}
    request.update(cores=request["cores"] or 1, nodes=request["nodes"] or 1, gpus=request["gpus"] or 0,
                   reservation=profile.reservation, constraint=profile.constraint, env_setup=profile.env_setup,
                   extra_directives=profile.extra_directives)
    _check_request(request, info)
    editable = {name: format_value(FIELDS[name], values[name]) for name in profile.user_editable
                if values.get(name) is not None}
    return Choice(profile, cluster, request, profile.command_prefix, {"profile": profile.name, **editable})


def _screen(options: Any) -> dict[str, Any]:
    """Field names known, types right, no control characters; empty strings and nulls dropped."""
    if not isinstance(options, Mapping):
        raise FormError("user_options", f"expected an object of fields, got {_kind(options)}")
    given: dict[str, Any] = {}
    for key, value in options.items():
        # a name that cannot be shown as it is (empty, control characters, too long) is named by its repr
        name = key if isinstance(key, str) and key and not CONTROL.search(key) and len(key) <= 64 else repr(key)[:64]
        if name in ADMIN_ONLY:
            raise FormError(name, "set by the administrators only (user options: " + ", ".join(USER_FIELDS) + ")")
        if name not in USER_FIELDS:
            raise FormError(name, "unknown field (user options: " + ", ".join(USER_FIELDS) + ")")
        if value is None:
            continue
        numeric = name in NUMERIC
        if isinstance(value, str):
            _check_text(name, value)
            if value.strip():
                given[name] = value.strip()
        elif numeric and isinstance(value, int) and not isinstance(value, bool):
            given[name] = value
        else:
            raise FormError(name, f"expected {'a whole number or text' if numeric else 'text'}, got {_kind(value)}")
    return given


def _check_text(name: str, value: str) -> None:
    if CONTROL.search(value):
        raise FormError(name, "contains a line break or control character")
    if len(value) > MAX_LENGTH:
        raise FormError(name, f"longer than {MAX_LENGTH} characters")


def _kind(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a decimal number", str: "text", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _take(profile: Profile, name: str, given: Mapping[str, Any], default: Any) -> Any:
    """The user's value, parsed (FormError if malformed), or the default; a field the profile does not let
    the user change must equal the default."""
    if name not in given:
        return default
    spec = FIELDS[name]
    try:
        value = parse_value(spec, given[name])
    except ValueError as err:
        message, allowed = err.args
        raise FormError(name, f"{given[name]!r}: {message} (allowed: {allowed})") from None
    if name not in profile.user_editable and value != default:
        fixed = format_value(spec, default) or "the scheduler's default"
        raise FormError(name, f"profile {profile.display_name!r} does not let you change it (it is {fixed})")
    return value


def _partition(profile: Profile, given: Mapping[str, Any], live: Sequence[PartitionInfo] | None) -> str | None:
    term = label(profile.cluster.scheduler, "partition").lower()
    partition = _take(profile, "partition", given, default_partition(profile, live))
    if partition is None:
        return None
    configured, offered = profile.offered_partitions(), partition_names(profile, live)
    if configured and partition not in configured:
        raise FormError("partition", f"{partition!r} is not a {term} of profile {profile.display_name!r} "
                                     f"(allowed: {', '.join(offered or configured)})")
    if live is not None and partition not in {p.name for p in live}:
        raise FormError("partition", f"{profile.cluster.display_name} has no {term} {partition!r} now"
                                     f" (available: {', '.join(offered) or 'none'})")
    return partition


def _named(profile: Profile, name: str, given: Mapping[str, Any], allowed: tuple[str, ...] | None,
           partition: str | None) -> str | None:
    value = _take(profile, name, given, default_value(profile, name))
    if value is None or allowed is None or value in allowed:
        return value
    scheduler = profile.cluster.scheduler
    where = f" in {label(scheduler, 'partition').lower()} {partition!r}" if partition else ""
    choices = ", ".join(allowed) if allowed else "none"
    raise FormError(name, f"{value!r} is not available to you{where} (allowed: {choices})")


def _number(profile: Profile, name: str, given: Mapping[str, Any], limit: Limit) -> int | None:
    spec = FIELDS[name]
    value = _take(profile, name, given, default_value(profile, name))
    if value is None:
        return None
    problem = None
    if value < limit.low:
        problem = f"{format_value(spec, value)} is less than {format_value(spec, limit.low)}, {limit.low_why}"
    elif limit.high is not None and value > limit.high:
        problem = f"{format_value(spec, value)} is more than {format_value(spec, limit.high)}, {limit.high_why}"
    if problem and name not in profile.user_editable:
        problem += f"; profile {profile.display_name!r} does not let you change it: choose another profile"
        if "partition" in profile.user_editable:
            problem += f" or {label(profile.cluster.scheduler, 'partition').lower()}"
    if problem:
        raise FormError(name, problem)
    return value


def _check_request(request: Mapping[str, Any], info: PartitionInfo | None) -> None:
    """The request as JobRequest builds it, then the scheduler's own view of the partition."""
    try:
        job = JobRequest(name="hpchub-check", tag="check", **request)
        if info is not None:
            check_request(job, info)
    except InvalidRequest as err:
        name = _REQUEST_FIELD.get(err.field, err.field)
        raise FormError(name, str(err).split(": ", 1)[-1]) from None


# --- the form -----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(loader=PackageLoader("batchspawner", "templates"),
                                autoescape=select_autoescape(default=True, default_for_string=True),
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_form(
    profiles: Sequence[Profile],
    *,
    partitions: Mapping[str, Sequence[PartitionInfo]],
    associations: Mapping[str, Associations | None],
    last: Mapping[str, Any] | None = None,
    user_name: str = "",
    server_name: str = "",
    preview: str = "",
) -> str:
    """The options form for the profiles a user may use (see `visible_profiles`): a profile choice and, per
    profile, its editable fields with the bounds of the chosen partition (each partition option carries its
    own in `data-limits`, which the form's script applies when the partition changes), idle nodes per
    partition, the user's accounts and QOS, and a preview of the job script that the script refreshes
    through the hub API (POST hub/api/batchspawner/preview, for `user_name`'s server `server_name`).
    `last` (the previous user_options) pre-fills it. Every value goes through autoescaping."""
    last = last if isinstance(last, Mapping) else {}
    names = [p.name for p in profiles]
    chosen = last.get("profile") if last.get("profile") in names else (names[0] if names else None)
    sections = [_section(p, partitions.get(p.cluster.name), associations.get(p.cluster.name),
                         last if p.name == chosen else {}) for p in profiles]
    clusters = list(dict.fromkeys(p.cluster.display_name for p in profiles))
    return _environment().get_template("options_form.html.j2").render(
        sections=sections, chosen=chosen, several_clusters=len(clusters) > 1, user_name=user_name,
        server_name=server_name, preview=preview,
    )


def _section(profile: Profile, live: Sequence[PartitionInfo] | None, associations: Associations | None,
             last: Mapping[str, Any]) -> dict[str, Any]:
    cluster = profile.cluster
    offered = partition_names(profile, live)
    partition = default_partition(profile, live)
    if "partition" in profile.user_editable and isinstance(last.get("partition"), str) \
            and last["partition"] in offered:
        partition = last["partition"]
    per_partition = {name: _partition_limits(profile, name, partition_info(live, name), associations)
                     for name in (offered or [partition])}
    current = per_partition[partition] if partition in per_partition else _partition_limits(
        profile, partition, partition_info(live, partition), associations)
    fields = [_field_view(profile, name, partition, current, per_partition, live, associations, last)
              for name in FIELDS if name in profile.user_editable and name in cluster.fields]
    fixed = [(label(cluster.scheduler, name), _fixed_text(profile, name, partition))
             for name in FIELDS if name in cluster.fields and name not in profile.user_editable]
    notes = []
    if live is None and "partition" in cluster.fields:
        notes.append(f"{cluster.display_name} did not report its {label(cluster.scheduler, 'partition').lower()}s "
                     "just now: only the administrators' limits are shown.")
    elif "partition" in cluster.fields and not offered:
        notes.append(f"None of this profile's {label(cluster.scheduler, 'partition').lower()}s exists on "
                     f"{cluster.display_name} now.")
    return {
        "name": profile.name, "display_name": profile.display_name, "description": profile.description,
        "cluster": cluster.display_name, "scheduler": SCHEDULER_NAMES[cluster.scheduler],
        "partition": partition or "", "limits": json.dumps(current), "fields": fields,
        "fixed": [(k, v) for k, v in fixed if v], "notes": notes, "prefilled": bool(last),
    }


def _partition_limits(profile: Profile, partition: str | None, info: PartitionInfo | None,
                      associations: Associations | None) -> dict[str, Any]:
    """What the form's script applies when `partition` is chosen: numeric bounds and allowed names."""
    limits = field_limits(profile, partition, info)
    return {
        "fields": {name: {"min": limit.low, "max": limit.high, "hint": limit.hint(name)}
                   for name, limit in limits.items()},
        "allowed": allowed_names(profile, partition, info, associations),
    }


def _field_view(profile: Profile, name: str, partition: str | None, current: Mapping[str, Any],
                per_partition: Mapping[str | None, Any], live: Sequence[PartitionInfo] | None,
                associations: Associations | None, last: Mapping[str, Any]) -> dict[str, Any]:
    """How one editable field is shown: its widget, value (the last choice, else the default), bounds or
    options."""
    spec, scheduler = FIELDS[name], profile.cluster.scheduler
    value = format_value(spec, default_value(profile, name))
    if last.get(name) is not None and not isinstance(last[name], (bool, list, dict)):
        value = str(last[name])
    view: dict[str, Any] = {"field": name, "input": f"{profile.name}.{name}", "label": label(scheduler, name),
                            "id": f"hpchub-{profile.name}-{name}", "value": value, "hint": "", "options": []}
    if name == "partition":
        view.update(widget="select", value=partition or "")
        view["options"] = [{"value": p, "text": _partition_text(p, partition_info(live, p), limits),
                            "limits": json.dumps(limits), "selected": p == partition, "disabled": False}
                           for p, limits in per_partition.items() if p]
    elif spec.numeric:
        limit = current["fields"][name]
        view.update(widget="number" if spec.kind == "count" else "text", min=limit["min"], max=limit["max"],
                    hint=limit["hint"], pattern=_HTML_PATTERNS.get(spec.kind, ""))
    else:
        union = list(dict.fromkeys(v for limits in per_partition.values() for v in (limits["allowed"][name] or ())))
        if any(limits["allowed"][name] is not None for limits in per_partition.values()):
            allowed_now = current["allowed"][name]
            view["widget"] = "select"
            view["options"] = [{"value": "", "text": _unset_text(name, associations), "selected": value == "",
                                 "disabled": False}] + [
                {"value": v, "text": v, "selected": v == value,
                 "disabled": allowed_now is not None and v not in allowed_now} for v in union]
        else:
            view.update(widget="text", hint=NAME_ALLOWED, pattern=_HTML_PATTERNS["name"])
    return view


def _partition_text(name: str, info: PartitionInfo | None, limits: Mapping[str, Any]) -> str:
    if info is None:
        return name
    text = f"{name}: {info.nodes_idle} of {info.nodes_total} nodes idle"
    if info.state != "up":
        text += f", {info.state}"
    walltime = limits["fields"]["walltime"]["max"]
    if walltime is not None:
        text += f", up to {format_value(FIELDS['walltime'], walltime)}"
    return text


def _unset_text(name: str, associations: Associations | None) -> str:
    if name == "account":
        default = associations.default_account if associations else None
        return f"your default account ({default})" if default else "your default account"
    if name == "qos":
        default = associations.default_qos if associations else None
        return f"the default QOS ({default})" if default else "the default QOS"
    return {"gpu_type": "any type", "parallel_environment": "the site's choice"}[name]


def _fixed_text(profile: Profile, name: str, partition: str | None) -> str:
    if name == "partition":
        return partition or ""
    value = default_value(profile, name)
    if name == "gpus" and not value:
        return ""
    return format_value(FIELDS[name], value)
