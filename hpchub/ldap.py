"""LDAP login for JupyterHub (ldap3) that never blocks the hub.

Every directory call runs in a bounded thread pool, under connect and receive timeouts, with an overall
limit on each login. Servers are tried in order; one that failed (refused, hung, TLS error) goes to the
back of the line for a while. Searches use pooled service-account connections. Values placed in a DN or
a filter are escaped (RFC 4514/4515); blank passwords never reach a bind. The auth state carries the
user's POSIX account and groups: `posix_account` reads it, `auth_state_hook` hands it to the spawner.
"""
from __future__ import annotations

import asyncio
import os
import queue
import re
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from jupyterhub.auth import Authenticator
from ldap3 import ANONYMOUS, BASE, NONE, SIMPLE, SUBTREE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import LDAPCommunicationError, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn
from tornado import web
from traitlets import Bool, Enum, Float, Integer, List, Set, TraitError, Unicode, default, validate

POSIX_USERNAME = r"^[a-z_][a-z0-9_.-]{0,31}$"
ACCOUNT_ATTRIBUTES = ("uid", "uidNumber", "gidNumber", "homeDirectory", "loginShell")
MEMBERSHIP_STYLES = ("memberOf", "member", "uniqueMember", "memberUid")
UNAVAILABLE = ("The login service cannot reach the user directory right now. Try again in a few minutes; "
               "if it keeps failing, tell your administrators.")
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
# a server counts as failed, and the next one is tried, on: no answer, a cut session, a TLS failure
_SERVER_ERRORS = (LDAPCommunicationError, LDAPStartTLSError, OSError)
_BUSY = {51, 52}  # LDAP result codes busy, unavailable
_INVALID_CREDENTIALS = 49


# --- the POSIX account, for the spawner --------------------------------------------------------------

@dataclass(frozen=True)
class PosixAccount:
    """Whom a user's jobs run as: the directory's uid, uidNumber, gidNumber, home and shell."""
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError(f"{self.name}: uidNumber {self.uid}, gidNumber {self.gid}: jobs never run as root")
        if not os.path.isabs(self.home):
            raise ValueError(f"{self.name}: homeDirectory {self.home!r} is not an absolute path")


def posix_account(auth_state: Mapping[str, Any] | None) -> PosixAccount | None:
    """The account in an LDAPAuthenticator auth state; None without one (auth state not enabled, another
    authenticator, an entry that is no posixAccount); ValueError when the entry is unusable."""
    if not auth_state or auth_state.get("uidNumber") is None:
        return None
    try:
        uid, gid = int(auth_state["uidNumber"]), int(auth_state["gidNumber"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{auth_state.get('uid')}: uidNumber and gidNumber must be numbers") from None
    return PosixAccount(name=str(auth_state.get("uid") or ""), uid=uid, gid=gid,
                        home=str(auth_state.get("homeDirectory") or ""), shell=str(auth_state.get("loginShell") or ""),
                        groups=tuple(auth_state.get("groups") or ()))


def auth_state_hook(spawner: Any, auth_state: Mapping[str, Any] | None) -> None:
    """For `c.Spawner.auth_state_hook`: sets `spawner.auth_state_account` to the PosixAccount or None."""
    spawner.auth_state_account = posix_account(auth_state)


# --- the blocking half: runs in the authenticator's worker threads only ------------------------------

class DirectoryError(Exception):
    """The directory gave no usable answer: no server answered, the service account or a search base is
    wrong. The message says what happened, for the log (users see UNAVAILABLE)."""


@dataclass(frozen=True)
class DirectoryConfig:
    """What `Directory` needs, checked by LDAPAuthenticator."""
    servers: tuple[str, ...]                # ldap:// or ldaps:// URLs, in order of preference
    start_tls: bool
    ca_file: str
    connect_timeout: float
    receive_timeout: int
    retry_after: float                      # seconds a failed server waits behind the others
    pool_size: int                          # idle service connections kept
    bind_dn_templates: tuple[str, ...]
    search_dn: str
    search_password: str = field(repr=False)
    user_search_base: str
    user_search_filter: str
    username_attribute: str
    group_search_base: str
    membership: tuple[str, ...]
    group_name_attribute: str
    nested_depth: int


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    attributes: dict[str, list[str]]
    groups: dict[str, str]                  # group DN (lower case) -> group name


def dn_value(value: str) -> str:
    """`value` escaped for a DN (RFC 4514); NUL as \\00, which ldap3 leaves raw."""
    return escape_rdn(value).replace("\\\x00", "\\00")


def _fill(template: str, **values: str) -> str:
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def _entries(conn: Connection) -> list[tuple[str, dict[str, list[str]]]]:
    """(DN, attributes) of the entries found; attribute names in lower case."""
    return [(r["dn"], {k.lower(): [v.decode("utf-8", "replace") for v in vs] for k, vs in r["raw_attributes"].items()})
            for r in conn.response or () if r.get("type") == "searchResEntry"]


def _close(conn: Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - a connection that failed may fail again while closing
        pass


class Directory:
    """Logins against one directory (several servers holding the same entries). Blocking: call it from
    worker threads; it is safe to share between them."""

    def __init__(self, config: DirectoryConfig):
        self.config = config
        self._tls = Tls(ca_certs_file=config.ca_file or None, validate=ssl.CERT_REQUIRED)
        self._failed_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[tuple[Connection, str]] = queue.LifoQueue()

    # servers and connections
    def _servers(self) -> list[str]:
        """The servers, those that failed recently last (stable order otherwise)."""
        now = time.monotonic()
        with self._lock:
            recent = {url for url, at in self._failed_at.items() if now - at < self.config.retry_after}
        return sorted(self.config.servers, key=lambda url: url in recent)

    def _failed(self, url: str) -> None:
        with self._lock:
            self._failed_at[url] = time.monotonic()

    def _server(self, url: str) -> Server:
        # a Server per connection: ldap3 keeps per-connection state in it
        parts = urlsplit(url)
        return Server(parts.hostname, port=parts.port, use_ssl=parts.scheme == "ldaps", tls=self._tls,
                      get_info=NONE, connect_timeout=self.config.connect_timeout)

    def connect(self, dn: str, password: str) -> tuple[Connection | None, int, str]:
        """Bind as `dn` (anonymously when empty) to the first server that answers: (the bound connection
        or None, the result code, the server's URL). DirectoryError when none answers."""
        problems = []
        for url in self._servers():
            conn = Connection(self._server(url), user=dn or None, password=password or None,
                              authentication=SIMPLE if dn else ANONYMOUS,
                              client_strategy=SYNC, receive_timeout=self.config.receive_timeout,
                              read_only=True, auto_referrals=False, raise_exceptions=False)
            try:
                conn.open()
                if self.config.start_tls and not conn.start_tls():
                    raise LDAPStartTLSError(f"StartTLS refused: {conn.result.get('description')}")
                bound = conn.bind()
            except _SERVER_ERRORS as e:
                _close(conn)
                self._failed(url)
                problems.append(f"{url}: {type(e).__name__}: {e}")
                continue
            code = conn.result.get("result", -1)
            if code in _BUSY:
                _close(conn)
                self._failed(url)
                problems.append(f"{url}: {conn.result.get('description')}")
                continue
            if bound:
                return conn, code, url
            _close(conn)
            return None, code, url
        raise DirectoryError("; ".join(problems))

    def _service(self) -> tuple[Connection, str]:
        try:
            conn, url = self._idle.get_nowait()
            if not conn.closed:
                return conn, url
        except queue.Empty:
            pass
        conn, code, url = self.connect(self.config.search_dn, self.config.search_password)
        if conn is None:
            raise DirectoryError(f"{url} refuses the service account {self.config.search_dn!r} (LDAP result "
                                       f"{code}): check LDAPAuthenticator.search_bind_dn and search_bind_password")
        return conn, url

    def search(self, base: str, search_filter: str, attributes: list[str], *, scope: str = SUBTREE,
               limit: int = 0, conn: Connection | None = None) -> list[tuple[str, dict[str, list[str]]]]:
        """Entries found on `conn`, or else on a pooled service connection (a broken one is replaced,
        once, by a fresh one, from another server if that one failed)."""
        if conn is not None:
            return self._search_on(conn, base, search_filter, attributes, scope, limit)
        error = None
        for _ in range(2):
            service, url = self._service()
            try:
                found = self._search_on(service, base, search_filter, attributes, scope, limit)
            except _SERVER_ERRORS as e:
                _close(service)
                self._failed(url)
                error = DirectoryError(f"search on {url}: {type(e).__name__}: {e}")
                continue
            except DirectoryError:
                _close(service)
                raise
            if self._idle.qsize() < self.config.pool_size:
                self._idle.put((service, url))
            else:
                _close(service)
            return found
        raise error

    def _search_on(self, conn: Connection, base: str, search_filter: str, attributes: list[str], scope: str,
                   limit: int) -> list[tuple[str, dict[str, list[str]]]]:
        conn.search(base, search_filter, search_scope=scope, attributes=attributes, size_limit=limit,
                    time_limit=self.config.receive_timeout)
        code = conn.result.get("result", -1)
        if code in _BUSY:
            raise LDAPCommunicationError(f"server {conn.result.get('description')}")
        if code == 32:
            raise DirectoryError(f"the search base {base!r} does not exist on {conn.server.host}")
        if code not in (0, 4):  # success, sizeLimitExceeded (with the entries so far)
            raise DirectoryError(f"search {search_filter} under {base!r} failed: "
                                 f"{conn.result.get('description')} {conn.result.get('message')}".strip())
        return _entries(conn)

    # logins
    def login(self, username: str, password: str) -> DirectoryUser | str:
        """The user's entry and groups, or why the login is refused (for the log). `username` is
        normalised and matches the username pattern."""
        if not password.strip():
            return "blank password"  # an empty password is an anonymous bind on many servers
        wanted = [*ACCOUNT_ATTRIBUTES, self.config.username_attribute]
        if "memberOf" in self.config.membership:
            wanted.append("memberOf")
        if self.config.bind_dn_templates:
            return self._login_with_templates(username, password, wanted)
        search_filter = _fill(self.config.user_search_filter, username=escape_filter_chars(username),
                              username_attribute=self.config.username_attribute)
        found = self.search(self.config.user_search_base, search_filter, wanted, limit=2)
        if len(found) != 1:
            return f"{len(found)} entries match {search_filter}" if found else "unknown user"
        dn, attributes = found[0]
        conn, code, _ = self.connect(dn, password)
        if conn is None:
            return self._refusal(dn, code)
        _close(conn)
        return DirectoryUser(dn, attributes, self.groups(dn, username, attributes))

    def _login_with_templates(self, username: str, password: str, wanted: list[str]) -> DirectoryUser | str:
        code = _INVALID_CREDENTIALS
        for template in self.config.bind_dn_templates:
            dn = _fill(template, username=dn_value(username))
            conn, code, _ = self.connect(dn, password)
            if conn is None:
                continue
            try:
                found = self.search(dn, "(objectClass=*)", wanted, scope=BASE, conn=conn)
                attributes = found[0][1] if found else {}
                groups = self.groups(dn, username, attributes, conn=None if self.config.search_dn else conn)
            finally:
                _close(conn)
            return DirectoryUser(dn, attributes, groups)
        return self._refusal("the bind DN templates", code)

    @staticmethod
    def _refusal(dn: str, code: int) -> str:
        if code == _INVALID_CREDENTIALS:
            return f"wrong password or no such entry ({dn})"
        return f"bind as {dn} refused with LDAP result {code}"

    def groups(self, dn: str, uid: str, attributes: Mapping[str, list[str]], *,
               conn: Connection | None = None) -> dict[str, str]:
        """The user's groups, DN (lower case) -> name, by the configured membership styles, then the
        groups holding those, up to nested_depth levels."""
        c = self.config
        groups: dict[str, str] = {}
        if "memberOf" in c.membership:
            for group_dn in attributes.get("memberof", ()):
                groups[group_dn.lower()] = self._name_from_dn(group_dn)
        if not c.group_search_base:
            return groups
        clauses = [f"({style}={escape_filter_chars(dn)})" for style in ("member", "uniqueMember")
                   if style in c.membership]
        if "memberUid" in c.membership:
            clauses.append(f"(memberUid={escape_filter_chars(uid)})")
        self._groups_matching(clauses, groups, conn)
        new = list(groups)
        nested_styles = [s for s in ("member", "uniqueMember") if s in c.membership]
        for _ in range(c.nested_depth):
            clauses = [f"({style}={escape_filter_chars(g)})" for g in new for style in nested_styles]
            new = self._groups_matching(clauses, groups, conn)
        return groups

    def _groups_matching(self, clauses: list[str], groups: dict[str, str], conn: Connection | None) -> list[str]:
        """Adds the groups matching any of `clauses` to `groups`; returns the DNs that were new."""
        if not clauses:
            return []
        name = self.config.group_name_attribute
        new = []
        for group_dn, attributes in self.search(self.config.group_search_base, f"(|{''.join(clauses)})", [name],
                                                conn=conn):
            if group_dn.lower() not in groups:
                new.append(group_dn)
                groups[group_dn.lower()] = (attributes.get(name.lower()) or [self._name_from_dn(group_dn)])[0]
        return new

    def _name_from_dn(self, group_dn: str) -> str:
        """The value of the first RDN when it is the group name attribute (cn=x,...), else the whole DN."""
        try:
            attribute, value, _ = parse_dn(group_dn)[0]
        except Exception:  # noqa: BLE001 - a malformed DN from the server names the group as it is
            return group_dn
        return value if attribute.lower() == self.config.group_name_attribute.lower() else group_dn


# --- the JupyterHub side ---------------------------------------------------------------------------

def _seconds(default_value: float, help_text: str, maximum: float = 600.0) -> Float:
    return Float(default_value, min=0.1, max=maximum, help=f"{help_text} Seconds, 0.1 to {maximum:g}.").tag(config=True)


class LDAPAuthenticator(Authenticator):
    """Logs users in with their LDAP password: a bind with DN templates, or search-then-bind with a
    service account; groups decide who may log in and who is admin. Never blocks the hub: the directory
    is used from a bounded thread pool, under timeouts."""

    server_urls = List(Unicode(), help="""LDAP servers holding the same directory, tried in this order
        (one that failed is tried after the others for `server_retry_seconds`), e.g.
        ["ldap://ldap1.example.org", "ldap://ldap2.example.org:389"]. Scheme ldap:// (for tls_mode
        "starttls" or "plain") or ldaps:// (for tls_mode "ldaps"); no path.""").tag(config=True)
    tls_mode = Enum(["starttls", "ldaps", "plain"], "starttls", help="""How the connection is protected:
        "starttls" (ldap:// URLs, StartTLS before the bind), "ldaps" (ldaps:// URLs, TLS from the start),
        "plain" (no TLS: passwords cross the network readable, so it also needs allow_plaintext).
        Certificates are always verified.""").tag(config=True)
    allow_plaintext = Bool(False, help="""Allow tls_mode "plain". Only for a directory reached over a
        trusted local link (loopback, a socket on the same host).""").tag(config=True)
    ca_file = Unicode("", help="""PEM file of the CA certificates that sign the servers' certificates;
        empty: the system's CA store. Must be readable by the hub.""").tag(config=True)
    connect_timeout = _seconds(5.0, "Limit on opening a TCP connection to one server.", 120)
    receive_timeout = Integer(5, min=1, max=120, help="""Limit on waiting for one answer from a server
        (StartTLS, TLS handshake, bind, search). Whole seconds (ldap3 takes no fractions), 1 to 120.""",
                              ).tag(config=True)
    login_timeout = _seconds(30.0, """Limit on a whole login, all servers and searches
        included, queueing for a worker thread too. Past it the user gets "try again later".""")
    server_retry_seconds = _seconds(60.0, """How long a server that failed is
        tried only after the others.""", 86400)
    thread_pool_size = Integer(4, min=1, max=64, help="""Worker threads for directory calls: at most this
        many logins talk to the directory at once; more wait (within login_timeout). Also the number of
        idle service-account connections kept for reuse.""").tag(config=True)

    bind_dn_templates = List(Unicode(), help="""Bind directly with these DNs, tried in order, {username}
        replaced by the escaped username, e.g. ["uid={username},ou=people,dc=example,dc=org"]. Use this or
        user_search_base (search-then-bind), not both.""").tag(config=True)
    search_bind_dn = Unicode("", help="""The service account that searches users and groups (empty:
        anonymous searches, or, with bind_dn_templates, searches as the user who logs in).""").tag(config=True)
    search_bind_password = Unicode("", help="""The service account's password. Keep it out of the config
        file: e.g. `c.LDAPAuthenticator.search_bind_password = open("/etc/hpchub/ldap-password").read().strip()`
        with that file readable by the hub only.""").tag(config=True)
    user_search_base = Unicode("", help="""Where users are searched (search-then-bind), e.g.
        "ou=people,dc=example,dc=org".""").tag(config=True)
    username_attribute = Unicode("uid", help="The attribute holding the login name.").tag(config=True)
    user_search_filter = Unicode("(&(objectClass=posixAccount)({username_attribute}={username}))", help="""
        The filter that finds a user; {username} becomes the escaped login name and {username_attribute}
        the attribute above. Exactly one entry must match.""").tag(config=True)

    group_search_base = Unicode("", help="""Where groups are searched, e.g. "ou=groups,dc=example,dc=org";
        empty: only the user's memberOf attribute tells the groups.""").tag(config=True)
    group_membership = List(Enum(MEMBERSHIP_STYLES), list(MEMBERSHIP_STYLES), help="""How membership is
        recorded: "memberOf" (an attribute of the user), "member" (groupOfNames), "uniqueMember"
        (groupOfUniqueNames) and "memberUid" (posixGroup, the login name).""").tag(config=True)
    group_name_attribute = Unicode("cn", help="The attribute holding a group's name.").tag(config=True)
    nested_group_depth = Integer(0, min=0, max=10, help="""Also count the groups that hold the user's
        groups (member/uniqueMember), this many levels up; 0: direct membership only.""").tag(config=True)
    allowed_groups = Set(Unicode(), help="""Members of these groups (names or DNs) may log in, besides
        allowed_users.""").tag(config=True, allow_config=True)
    admin_groups = Set(Unicode(), help="""Members of these groups (names or DNs) are admins; others are not,
        unless in admin_users.""").tag(config=True)

    @default("username_pattern")
    def _default_username_pattern(self) -> str:
        return POSIX_USERNAME

    @default("username_regex")
    def _default_username_regex(self) -> re.Pattern:
        return re.compile(self.username_pattern)

    @validate("server_urls")
    def _check_urls(self, proposal: dict) -> list[str]:
        for url in proposal["value"]:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as e:
                raise TraitError(f"LDAPAuthenticator.server_urls: {url!r}: {e}") from None
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/") \
                    or parts.query or parts.username:
                raise TraitError(f"LDAPAuthenticator.server_urls: {url!r} is not ldap://host[:port] or "
                                 "ldaps://host[:port]")
        return proposal["value"]

    @validate("ca_file")
    def _check_ca_file(self, proposal: dict) -> str:
        path = proposal["value"]
        if path and not os.access(path, os.R_OK):
            raise TraitError(f"LDAPAuthenticator.ca_file: cannot read {path!r}")
        return path

    @validate("bind_dn_templates")
    def _check_templates(self, proposal: dict) -> list[str]:
        for template in proposal["value"]:
            if "{username}" not in template:
                raise TraitError(f"LDAPAuthenticator.bind_dn_templates: {template!r} has no {{username}}")
        return proposal["value"]

    @validate("user_search_filter")
    def _check_filter(self, proposal: dict) -> str:
        value = proposal["value"]
        if "{username}" not in value or not (value.startswith("(") and value.endswith(")")):
            raise TraitError(f"LDAPAuthenticator.user_search_filter: {value!r} must be a filter in parentheses "
                             "holding {username}")
        return value

    @validate("username_attribute", "group_name_attribute")
    def _check_attribute(self, proposal: dict) -> str:
        if not _ATTRIBUTE_NAME.match(proposal["value"]):
            raise TraitError(f"LDAPAuthenticator.{proposal['trait'].name}: {proposal['value']!r} is not an "
                             "attribute name")
        return proposal["value"]

    @validate("username_pattern")
    def _check_pattern(self, proposal: dict) -> str:
        try:
            re.compile(proposal["value"])
        except re.error as e:
            raise TraitError(f"LDAPAuthenticator.username_pattern: {proposal['value']!r}: {e}") from None
        return proposal["value"]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.directory = Directory(self._directory_config())
        self._executor = ThreadPoolExecutor(self.thread_pool_size, thread_name_prefix="ldap")

    def _directory_config(self) -> DirectoryConfig:
        """The settings, checked together; ValueError says what to change."""
        problems = []
        if not self.server_urls:
            problems.append('set server_urls, e.g. ["ldap://ldap.example.org"]')
        want = "ldaps" if self.tls_mode == "ldaps" else "ldap"
        problems += [f"{url!r} does not fit tls_mode {self.tls_mode!r}: use {want}:// URLs" + (
            ' or tls_mode "ldaps"' if want == "ldap" else "") for url in self.server_urls
            if urlsplit(url).scheme != want]
        if self.tls_mode == "plain" and not self.allow_plaintext:
            problems.append('tls_mode "plain" sends passwords readable: also set allow_plaintext = True, or use '
                            '"starttls" or "ldaps"')
        if bool(self.bind_dn_templates) == bool(self.user_search_base):
            problems.append("set either bind_dn_templates (bind directly) or user_search_base (search, then bind)")
        if bool(self.search_bind_dn) != bool(self.search_bind_password):
            problems.append("search_bind_dn and search_bind_password go together")
        needs_groups = self.allowed_groups or self.admin_groups or self.manage_groups
        if needs_groups and not self.group_search_base and "memberOf" not in self.group_membership:
            problems.append("groups are used (allowed_groups, admin_groups or manage_groups) but cannot be "
                            'found: set group_search_base, or include "memberOf" in group_membership')
        if problems:
            raise ValueError("LDAPAuthenticator configuration: " + "; ".join(problems))
        return DirectoryConfig(
            servers=tuple(self.server_urls), start_tls=self.tls_mode == "starttls", ca_file=self.ca_file,
            connect_timeout=self.connect_timeout, receive_timeout=self.receive_timeout,
            retry_after=self.server_retry_seconds, pool_size=self.thread_pool_size,
            bind_dn_templates=tuple(self.bind_dn_templates), search_dn=self.search_bind_dn,
            search_password=self.search_bind_password, user_search_base=self.user_search_base,
            user_search_filter=self.user_search_filter, username_attribute=self.username_attribute,
            group_search_base=self.group_search_base, membership=tuple(self.group_membership),
            group_name_attribute=self.group_name_attribute, nested_depth=self.nested_group_depth)

    def normalize_username(self, username: str) -> str:
        return super().normalize_username(username.strip())

    async def authenticate(self, handler: Any, data: Mapping[str, str]) -> dict | None:
        username = self.normalize_username(str(data.get("username") or ""))
        password = str(data.get("password") or "")
        shown = username if len(username) <= 40 else username[:40] + "..."
        if not self.validate_username(username):
            self.log.warning("LDAP login refused for %r: not a valid username (username_pattern %s)",
                             shown, self.username_pattern)
            return None
        if not password.strip():
            self.log.warning("LDAP login refused for %r: blank password", shown)
            return None
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            work = loop.run_in_executor(self._executor, self.directory.login, username, password)
            user = await asyncio.wait_for(work, self.login_timeout)
        except asyncio.TimeoutError:
            self.log.error("LDAP login for %r: no answer within login_timeout (%g s)", shown, self.login_timeout)
            raise web.HTTPError(503, UNAVAILABLE) from None
        except DirectoryError as e:
            self.log.error("LDAP login for %r failed after %.1f s: %s", shown, time.monotonic() - started, e)
            raise web.HTTPError(503, UNAVAILABLE) from None
        if isinstance(user, str):
            self.log.warning("LDAP login refused for %r: %s", shown, user)
            return None
        groups = sorted(set(user.groups.values()))
        state: dict[str, Any] = {name: (user.attributes.get(name.lower()) or [None])[0] for name in ACCOUNT_ATTRIBUTES}
        for name in ("uidNumber", "gidNumber"):
            if state[name] is not None and state[name].isdigit():
                state[name] = int(state[name])
        state.update(dn=user.dn, groups=groups, group_dns=sorted(user.groups))
        self.log.info("LDAP password accepted for %r: %s, groups: %s (%.2f s)", username, user.dn,
                      ", ".join(groups) or "none", time.monotonic() - started)
        model = {"name": username, "auth_state": state}
        if self.manage_groups:
            model["groups"] = groups
        return model

    @staticmethod
    def _in(wanted: set[str], authentication: Mapping | None) -> bool:
        """Whether the logged-in user is in one of the `wanted` groups (by name or DN, any case)."""
        state = (authentication or {}).get("auth_state") or {}
        theirs = {g.lower() for g in state.get("groups", ())} | set(state.get("group_dns", ()))
        return bool(theirs & {w.lower() for w in wanted})

    def check_allowed(self, username: str, authentication: Mapping | None = None) -> bool:
        if super().check_allowed(username, authentication) or self._in(self.allowed_groups, authentication):
            return True
        if self.allowed_groups and authentication and (authentication.get("auth_state") or {}).get("dn"):
            # they proved their password: say why, rather than "invalid username or password"
            raise web.HTTPError(403, "Your account is not in a group that may use this hub. Ask your "
                                     "administrators for access.")
        return False

    def is_admin(self, handler: Any, authentication: Mapping) -> bool | None:
        if authentication["name"] in self.admin_users or self._in(self.admin_groups, authentication):
            return True
        return False if self.admin_groups else None
