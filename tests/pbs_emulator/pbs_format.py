"""How PBS Professional's qstat prints jobs, queues and the server (`-f -F json`, `-f`, the default table for jobs),
and how pbsnodes prints nodes (`-a -F json`, `-a`).

An object (a job, queue, server or node) is (name, attributes); an attribute is (name, value) where the value is a
string, or a dict for the attributes PBS splits into resources (Resource_List, resources_max, resources_available...)
or variables (Variable_List). The server sends every value as a string; the writers decide, as qstat and pbsnodes
do, what is printed as a number.
"""
from __future__ import annotations

import re
import time
from typing import Mapping, Sequence, Union

Value = Union[str, Mapping[str, str]]
Attributes = Sequence[tuple[str, Value]]
Job = tuple[str, Attributes]
Object = tuple[str, Attributes]

# qstat's JSON writer (src/lib/Libcmds/pbs_json.c before cJSON) prints a value bare when strtod() reads all
# of it, so "12", "1e3", "inf", "0x1F" and even "" come out as JSON numbers; the rest is quoted.
_STRTOD_WHOLE = re.compile(
    r"\s*([+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|inf(inity)?|nan(\(\w*\))?|0x[0-9a-f.]+(p[+-]?\d+)?))?\s*", re.IGNORECASE)
# that writer escapes control characters only: a '"' or '\' in a value is printed as is (invalid JSON)
_CONTROL_ESCAPES = str.maketrans({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
# prt_attr() breaks a long value at its commas to keep lines under this many characters
_LINE_LIMIT = 78


def json_document(timestamp: int, version: str, server: str, kind: str, objects: Sequence[Object]) -> str:
    """`qstat -f -F json` ("Jobs"), `qstat -Q -f -F json` ("Queue"), `qstat -B -f -F json` ("Server"),
    `pbsnodes -a -F json` ("nodes"): four-space indents, `"key":value`, and the `kind` member only when there is
    an object."""
    top: list[tuple[str, object]] = [("timestamp", timestamp), ("pbs_version", version), ("pbs_server", server)]
    if objects:
        convert = _node_json if kind == "nodes" else dict
        top.append((kind, {name: convert(attributes) for name, attributes in objects}))
    return "{\n" + _json_members(top, 4) + "\n}\n"


def _node_json(attributes: Attributes) -> dict[str, object]:
    """pbsnodes' encode_to_json(): "jobs" ("1.s/0, 1.s/1, 2.s/2") becomes an array naming each job once, and
    resources_assigned keeps only what is not zero."""
    node: dict[str, object] = {}
    for name, value in attributes:
        if name == "jobs" and isinstance(value, str):
            ids = [entry.strip().partition("/")[0] for entry in value.split(",")]
            node[name] = [job for i, job in enumerate(ids) if i == 0 or job != ids[i - 1]]
        elif name == "resources_assigned" and isinstance(value, Mapping):
            node[name] = {k: v for k, v in value.items() if not v.startswith("0")}
        else:
            node[name] = value
    return node


def _json_members(members: Sequence[tuple[str, object]], indent: int) -> str:
    pad = " " * indent
    lines = []
    for key, value in members:
        if isinstance(value, Mapping) and not value:
            lines.append(f'{pad}"{key}":{{\n{pad}}}')  # generate_json() closes an empty object on the next line
        elif isinstance(value, Mapping):
            lines.append(f'{pad}"{key}":{{\n{_json_members(list(value.items()), indent + 4)}\n{pad}}}')
        elif isinstance(value, list):
            items = ",\n".join(f'{pad}    "{item.translate(_CONTROL_ESCAPES)}"' for item in value)
            lines.append(f'{pad}"{key}":[\n{items}\n{pad}]')
        elif isinstance(value, int):
            lines.append(f'{pad}"{key}":{value}')
        elif _STRTOD_WHOLE.fullmatch(value):
            lines.append(f'{pad}"{key}":{value}')
        else:
            lines.append(f'{pad}"{key}":"{value.translate(_CONTROL_ESCAPES)}"')
    return ",\n".join(lines)


def full_text(objects: Sequence[Object], header: str) -> str:
    """`qstat -f` ("Job Id: "), `qstat -Q -f` ("Queue: "), `qstat -B -f` ("Server: "): the header and the name,
    one `    name[.resource] = value` per attribute, a blank line after each object."""
    out = []
    for job_id, attributes in objects:
        out.append(f"{header}{job_id}\n")
        for name, value in attributes:
            if name == "Variable_List":
                out.append(_wrapped(name, ",".join(f"{k}={v}" for k, v in value.items())) + "\n")
            elif isinstance(value, Mapping):
                out.extend(_wrapped(f"{name}.{resource}", text) + "\n" for resource, text in value.items())
            else:
                out.append(_wrapped(name, value) + "\n")
        out.append("\n")
    return "".join(out)


def node_text(nodes: Sequence[Object]) -> str:
    """`pbsnodes -a`: the node's name, then `     name[.resource] = value` per attribute (the two times as ctime()
    strings), a blank line after each node."""
    out = []
    for name, attributes in nodes:
        out.append(f"{name}\n")
        for attribute, value in attributes:
            if isinstance(value, Mapping):
                out.extend(f"     {attribute}.{resource} = {text}\n" for resource, text in value.items())
            elif attribute in ("last_state_change_time", "last_used_time"):
                out.append(f"     {attribute} = {time.ctime(int(value))}\n")
            else:
                out.append(f"     {attribute} = {value}\n")
        out.append("\n")
    return "".join(out)


def _wrapped(name: str, value: str) -> str:
    """prt_attr(): comma-separated parts stay whole on a line while they fit; the rest continues after a tab."""
    text = f"    {name} = "
    column = len(name) + 7
    for number, part in enumerate(value.split(",")):
        if number:
            text += ","
        if len(part) + column < _LINE_LIMIT:
            text += part
            column += len(part)
            continue
        if number:
            text += "\n\t"
            column = 9
        for char in part:
            text += char
            column += 1
            if column > _LINE_LIMIT:
                text += "\n\t"
                column = 8
    return text


def table(jobs: Sequence[Job]) -> str:
    """The default `qstat` display: one line per job, names truncated with '*' as qstat does."""
    if not jobs:
        return ""
    lines = ["Job id            Name             User              Time Use S Queue",
             "----------------  ---------------- ----------------  -------- - -----"]
    for job_id, attributes in jobs:
        attrs = dict(attributes)
        name, owner = str(attrs["Job_Name"]), str(attrs["Job_Owner"]).partition("@")[0]
        # qstat's own cuts: an id over 17 and an owner over 16 characters end in '*' at that width; a name of 16
        # or more is cut to 15 and the '*'
        job_id = job_id if len(job_id) <= 17 else job_id[:16] + "*"
        owner = owner if len(owner) <= 16 else owner[:15] + "*"
        name = name if len(name) < 16 else name[:15] + "*"
        used = attrs.get("resources_used", {})
        lines.append(f"{job_id:<17} {name:<16} {owner:<16}  {used.get('cput', '0'):>8} {attrs['job_state']} "
                     f"{attrs['queue']}")
    return "\n".join(lines) + "\n"
