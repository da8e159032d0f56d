"""A Jupyter server extension, enabled in the job's server: shared folders marked read-only refuse writes.

The job links each of its profile's shared folders into the home directory (~/shared/NAME) and lists the
read-only ones in HPCHUB_READ_ONLY_PATHS (colon-separated, relative to the server's root). Saving, creating,
renaming or deleting anything at or below them through the Jupyter API answers 403. (A terminal writes
through the filesystem: there the folder's own permissions decide.)
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from tornado import web


def read_only_paths(environ: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(p.strip("/") for p in environ.get("HPCHUB_READ_ONLY_PATHS", "").split(":") if p.strip("/"))


def is_read_only(path: str, read_only: tuple[str, ...]) -> bool:
    path = path.strip("/")
    return any(path == prefix or path.startswith(prefix + "/") for prefix in read_only)


# the contents manager's writing methods, and where their paths are: (position, keyword) pairs
_WRITERS = {
    "save": ((1, "path"),),
    "new": ((1, "path"),),
    "new_untitled": ((0, "path"),),
    "delete_file": ((0, "path"),),
    "rename_file": ((0, "old_path"), (1, "new_path")),
}


def guard(contents_manager: Any, read_only: tuple[str, ...]) -> None:
    """Make the contents manager's writing methods refuse paths at or below `read_only` (HTTP 403)."""
    for name, places in _WRITERS.items():
        method = getattr(contents_manager, name, None)
        if method is not None:
            setattr(contents_manager, name, _refusing(method, places, read_only))


def _refusing(method: Callable, places: tuple[tuple[int, str], ...], read_only: tuple[str, ...]) -> Callable:
    def check(*args: Any, **kwargs: Any) -> Any:
        for position, keyword in places:
            path = args[position] if len(args) > position else kwargs.get(keyword, "")
            if isinstance(path, str) and is_read_only(path, read_only):
                raise web.HTTPError(403, f"{path} is in a read-only shared folder")
        return method(*args, **kwargs)
    return check


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "hpchub.read_only"}]


def _load_jupyter_server_extension(serverapp) -> None:
    read_only = read_only_paths(os.environ)
    if read_only:
        guard(serverapp.contents_manager, read_only)
        serverapp.log.info("hpchub: read-only shared folders: %s", ", ".join(read_only))
