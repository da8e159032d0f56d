"""Job scripts, rendered from admin-controlled Jinja templates in a sandbox.

User values never become template source: they arrive as data in a validated `JobRequest`, and reach the
script only through the `directive` filter (a strict character set, so no line break or quote can add a
directive) or the `sh` filter (shell quoting).
"""
from __future__ import annotations

import re
import shlex
from functools import lru_cache
from typing import Any, Mapping, Sequence

from jinja2 import ChoiceLoader, FileSystemLoader, PackageLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from schedulers.base import JobRequest

_DIRECTIVE_VALUE = re.compile(r"[A-Za-z0-9_.:,=/%@+~&|()\[\]*-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateValueError(ValueError):
    """A value cannot be placed in a job script safely."""


def directive(value: Any) -> str:
    """A value for a scheduler directive line: no spaces, quotes, line breaks or shell metacharacters."""
    text = str(value)
    if not _DIRECTIVE_VALUE.fullmatch(text):
        raise TemplateValueError(f"{text!r} is not allowed in a job directive (allowed: letters, digits and _.:,=/%@+~-)")
    return text


def sh(value: Any) -> str:
    """Quote one shell word."""
    return shlex.quote(str(value))


def env_name(value: Any) -> str:
    text = str(value)
    if not _ENV_NAME.fullmatch(text):
        raise TemplateValueError(f"{text!r} is not a valid environment variable name")
    return text


def hms(seconds: int) -> str:
    """Seconds as [H]HH:MM:SS (hours may exceed 24), the form SGE and PBS take."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def dhms(seconds: int) -> str:
    """Seconds as D-HH:MM:SS, the form Slurm takes."""
    seconds = int(seconds)
    return f"{seconds // 86400}-{hms(seconds % 86400)}"


def single_line(value: Any) -> str:
    """An admin-written line (set-up commands, extra directives): one line, placed as written."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise TemplateValueError(f"{text!r} spans several lines; give one line per list entry")
    return text


@lru_cache(maxsize=16)
def _environment(template_dirs: tuple[str, ...]) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        loader=ChoiceLoader([FileSystemLoader(list(template_dirs)), PackageLoader("job_templates", ".")]),
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(directive=directive, sh=sh, env_name=env_name, hms=hms, dhms=dhms, single_line=single_line)
    return env


def render_job_script(
    template: str,
    request: JobRequest,
    *,
    user: str,
    env_file: str,
    command: Sequence[str],
    template_dirs: Sequence[str] = (),
) -> str:
    """Render `template` (searched in `template_dirs` first, then the packaged templates).

    The script holds no secret: it sources `env_file` (see `render_env_file`), written where only the user
    can read it. `command` is the argv that starts the single-user server.
    """
    return _environment(tuple(template_dirs)).get_template(template).render(
        request=request, user=user, env_file=env_file, command=list(command)
    )


def render_env_file(env: Mapping[str, str]) -> str:
    """The job's environment as shell `export` lines, every value quoted."""
    return "".join(f"export {env_name(name)}={sh(value)}\n" for name, value in sorted(env.items()))
