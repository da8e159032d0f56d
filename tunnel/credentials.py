"""One-time tunnel credentials: an Ed25519 key pair per job, issued when the job is submitted.

The private key goes to the job (the spawner writes it into the job's 0600 secret file); the public key
stays here, registered with the job's tag and the hub-side endpoint the gateway binds for that job alone.
A credential is good for a first connection within a window (`first_use_within` seconds); once used, only
for reconnects of the same job (one connection at a time) until it is revoked, which the hub does when
the server stops. Nothing here is persisted: `state()`/`restore()` let the spawner keep what a hub restart
needs (never the private key) in its own state.
"""
from __future__ import annotations

import os
import re
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

import asyncssh

# the tag is the SSH user name and part of a socket path: keep it to characters safe in both
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# sun_path is 108 bytes with the terminating NUL
_MAX_SOCKET_PATH = 107
# refusals remembered for the log ("revoked" rather than "unknown"): bounded, it is only for messages
_REVOKED_KEPT = 4096


class CredentialRefused(Exception):
    """A connection's credential is not (or no longer) good; the message says why, for the gateway's log."""


@dataclass(frozen=True)
class Endpoint:
    """Where the hub reaches a job's server: a Unix socket path, or a loopback TCP address.

    A TCP endpoint's port is 0 until the gateway binds it (the kernel picks a free one then, so nobody can
    squat it in between); the up-event carries the bound port."""

    path: str = ""
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def url(self) -> str:
        """The server's URL for JupyterHub and configurable-http-proxy (`http+unix://` for a socket)."""
        if self.path:
            return "http+unix://" + quote(self.path, safe="")
        return f"http://{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class IssuedCredential:
    """What `CredentialStore.issue` hands the spawner. `private_key` is the secret for the job's 0600 file."""

    tag: str
    endpoint: Endpoint
    public_key: str                              # OpenSSH one-line format
    private_key: str = field(repr=False)         # OpenSSH private key text, unencrypted


@dataclass
class _Registered:
    tag: str
    key: asyncssh.SSHKey
    endpoint: Endpoint
    first_use_by: float                          # wall-clock time; ignored once used
    used: bool = False
    holder: object | None = None                 # the connection using it now


class CredentialStore:
    """Registered job keys, each bound to one job's endpoint.

    With `socket_dir`, endpoints are Unix sockets `<socket_dir>/<tag>.sock`; the directory is created mode
    0700 (or must already be this user's and 0700): only the hub's user can connect to the sockets. Without
    it, endpoints are loopback TCP ports on `tcp_host`, chosen when the gateway binds them."""

    def __init__(self, socket_dir: str | None = None, *, first_use_within: float = 600.0,
                 tcp_host: str = "127.0.0.1", clock: Callable[[], float] = time.time) -> None:
        if first_use_within <= 0:
            raise ValueError(f"first_use_within must be positive, not {first_use_within!r}")
        self.socket_dir = _private_dir(socket_dir) if socket_dir else None
        self.first_use_within = first_use_within
        self.tcp_host = tcp_host
        self._clock = clock
        self._jobs: dict[str, _Registered] = {}
        self._revoked: OrderedDict[str, None] = OrderedDict()

    def issue(self, tag: str, *, first_use_within: float | None = None) -> IssuedCredential:
        """A fresh key pair for job `tag`, registered; replaces any earlier credential of that tag."""
        _check_tag(tag)
        if tag in self._jobs and self._jobs[tag].holder is not None:
            raise ValueError(f"job {tag} has a tunnel up: revoke its credential before issuing another")
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"hpchub-tunnel-{tag}")
        endpoint = self._endpoint_for(tag)
        window = self.first_use_within if first_use_within is None else first_use_within
        self._jobs[tag] = _Registered(tag, key.convert_to_public(), endpoint, self._clock() + window)
        self._revoked.pop(tag, None)
        return IssuedCredential(tag, endpoint, key.export_public_key("openssh").decode().strip(),
                                key.export_private_key("openssh").decode())

    def expect_first_use(self, tag: str, within: float) -> None:
        """Restart the first-use window of an unused credential: call it when the job starts running, so
        that the queue wait does not count against the window."""
        job = self._jobs.get(tag)
        if job is not None and not job.used:
            job.first_use_by = self._clock() + within

    def revoke(self, tag: str) -> object | None:
        """Forget `tag`'s credential; returns the connection that held it, which the caller closes."""
        job = self._jobs.pop(tag, None)
        if job is None:
            return None
        self._revoked[tag] = None
        while len(self._revoked) > _REVOKED_KEPT:
            self._revoked.popitem(last=False)
        return job.holder

    def state(self, tag: str) -> dict | None:
        """What the spawner keeps to re-register the credential after a hub restart (no secret in it)."""
        job = self._jobs.get(tag)
        if job is None:
            return None
        return {"tag": tag, "public_key": job.key.export_public_key("openssh").decode().strip(),
                "first_use_by": job.first_use_by, "used": job.used}

    def restore(self, state: dict) -> Endpoint:
        """Register again a credential from `state()`, e.g. when the hub restarted under a running job."""
        tag = state["tag"]
        _check_tag(tag)
        key = asyncssh.import_public_key(state["public_key"])
        job = _Registered(tag, key, self._endpoint_for(tag), float(state["first_use_by"]), bool(state["used"]))
        self._jobs[tag] = job
        self._revoked.pop(tag, None)
        return job.endpoint

    def check(self, tag: str, key: asyncssh.SSHKey) -> _Registered:
        """The registration `key` may use as job `tag`, or CredentialRefused saying why not."""
        job = self._jobs.get(tag)
        if job is None:
            if tag in self._revoked:
                raise CredentialRefused(f"the credential of job {tag} was revoked (its server stopped)")
            raise CredentialRefused(f"no credential was issued for job {tag!r}")
        if key.public_data != job.key.public_data:
            raise CredentialRefused(f"the key ({key.get_fingerprint()}) is not the credential of job {tag}")
        if not job.used and self._clock() > job.first_use_by:
            raise CredentialRefused(f"the credential of job {tag} expired unused "
                                    f"{self._clock() - job.first_use_by:.0f} s ago")
        if job.holder is not None:
            raise CredentialRefused(f"the credential of job {tag} is in use by another connection")
        return job

    def claim(self, tag: str, key: asyncssh.SSHKey, holder: object) -> Endpoint:
        """Mark the credential used by `holder` (a connection) after `check`; CredentialRefused when not."""
        job = self.check(tag, key)
        job.used = True
        job.holder = holder
        return job.endpoint

    def release(self, tag: str, holder: object) -> None:
        """`holder`'s connection ended: the credential stays good for a reconnect of the same job."""
        job = self._jobs.get(tag)
        if job is not None and job.holder is holder:
            job.holder = None

    def _endpoint_for(self, tag: str) -> Endpoint:
        if self.socket_dir is None:
            return Endpoint(host=self.tcp_host)
        path = os.path.join(self.socket_dir, f"{tag}.sock")
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"socket path {path!r} is longer than a Unix socket allows: use a shorter socket_dir")
        return Endpoint(path=path)


def _check_tag(tag: str) -> None:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"job tag {tag!r} must be 1-64 letters, digits, '_' or '-', starting with a letter or digit")


def _private_dir(path: str) -> str:
    """`path`, created mode 0700 when missing; an existing one must be ours and 0700."""
    path = os.path.abspath(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise ValueError(f"socket_dir {path!r} must be a directory owned by this user with mode 0700 "
                         f"(found mode {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid})")
    return path
