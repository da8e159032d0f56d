"""hpchub's admin configuration: one TOML file -> validated settings -> a traitlets Config.

Every key maps to one documented traitlet (`SETTINGS`, and docs/config.md); `clusters` and `profiles` go
whole to `BatchSpawner.clusters` and `BatchSpawner.profiles`, which batchspawner.profiles parses. Every
problem names the file, the dotted key, the bad value and what is allowed, and all are reported at once.
"""
from __future__ import annotations

import os
import ssl
import sys
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from traitlets import Bool, Enum, Float, Integer, List, Set, TraitError, TraitType, Unicode
from traitlets.config import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from batchspawner.profiles import (SCHEDULER_NAMES, SLUG, SLUG_ALLOWED, Catalog, ConfigError, Problem, Reader,
                                   absolute_path, choices, name_list, one_of, parse_catalog, show, text, whole)

SECTIONS = ("hub", "ldap", "roles", "spawner", "clusters", "profiles")
AUTHENTICATORS = {
    "demo": "hpchub.demo.DemoAuthenticator",
    "ldap": "hpchub.ldap.LDAPAuthenticator",
    "pam": "jupyterhub.auth.PAMAuthenticator",
}
_GROUP_AUTHENTICATORS = {"ldap": "LDAPAuthenticator", "pam": "PAMAuthenticator"}


@dataclass(frozen=True)
class Setting:
    """A TOML key and the traitlet it sets ("Class.trait")."""

    key: str
    traitlet: str


def _hub_settings() -> dict[str, Setting]:
    targets = {
        "bind_url": "JupyterHub.bind_url", "public_url": "JupyterHub.public_url", "ssl_cert": "JupyterHub.ssl_cert",
        "ssl_key": "JupyterHub.ssl_key", "db_url": "JupyterHub.db_url", "data_dir": "HpcHub.data_dir",
        "ledger_url": "BatchSpawner.ledger_url", "authenticator": "JupyterHub.authenticator_class",
        "admin_users": "Authenticator.admin_users", "allowed_users": "Authenticator.allowed_users",
        "admin_groups": "LDAPAuthenticator.admin_groups", "allowed_groups": "LDAPAuthenticator.allowed_groups",
        "admin_access": "JupyterHub.admin_access",
        "enable_auth_state": "Authenticator.enable_auth_state", "cull_idle_timeout": "HpcHub.cull_idle_timeout",
        "cull_every": "HpcHub.cull_every", "cull_max_age": "HpcHub.cull_max_age",
    }
    return {k: Setting(f"hub.{k}", v) for k, v in targets.items()}


LDAP_PASSWORD_FILE = "search_bind_password_file"
_LDAP_TRAITS = ("server_urls", "tls_mode", "allow_plaintext", "ca_file", "connect_timeout", "receive_timeout",
                "login_timeout", "server_retry_seconds", "thread_pool_size", "bind_dn_templates", "search_bind_dn",
                "user_search_base", "username_attribute", "user_search_filter", "group_search_base",
                "group_membership", "group_name_attribute", "nested_group_depth")
_SPAWNER_TRAITS = {"queue_timeout": "BatchSpawner", "server_start_timeout": "BatchSpawner",
                   "job_poll_interval": "BatchSpawner", "max_concurrent_submissions": "BatchSpawner",
                   "job_log_dir": "BatchSpawner", "job_run_dir": "BatchSpawner", "default_url": "Spawner",
                   "tunnel_gateway_ip": "BatchSpawner", "tunnel_host_key_file": "BatchSpawner",
                   "tunnel_ssh_client": "BatchSpawner", "tunnel_keepalive_interval": "BatchSpawner",
                   "tunnel_reconnect_timeout": "BatchSpawner", "walltime_warnings": "BatchSpawner",
                   "walltime_signal_lead": "BatchSpawner"}

SETTINGS: dict[str, Setting] = {
    **{s.key: s for s in _hub_settings().values()},
    **{f"ldap.{k}": Setting(f"ldap.{k}", f"LDAPAuthenticator.{k}") for k in _LDAP_TRAITS},
    f"ldap.{LDAP_PASSWORD_FILE}": Setting(f"ldap.{LDAP_PASSWORD_FILE}", "LDAPAuthenticator.search_bind_password"),
    **{f"spawner.{k}": Setting(f"spawner.{k}", f"{cls}.{k}") for k, cls in _SPAWNER_TRAITS.items()},
    "roles": Setting("roles", "JupyterHub.load_roles"),
    "clusters": Setting("clusters", "BatchSpawner.clusters"),
    "profiles": Setting("profiles", "BatchSpawner.profiles"),
}


def example_text() -> str:
    """The commented example that `hpchub --generate-config` writes."""
    return files("hpchub").joinpath("example.toml").read_text()


@dataclass(frozen=True)
class Settings:
    path: str
    config: Config
    catalog: Catalog
    #: the jupyterhub_config.py beside the TOML file, loaded after it; None when there is none
    beside: str | None

    def summary(self) -> str:
        hub = self.config.JupyterHub
        lines = [f"{self.path}: valid."]
        lines.append(f"  hub: {hub.get('bind_url', 'http://127.0.0.1:8000 (default)')}, authenticator "
                     f"{self._authenticator()}, database {_redact(hub.get('db_url', 'in the data directory'))}")
        for cluster in self.catalog.clusters.values():
            partitions = ", ".join(cluster.partitions) or "all the scheduler reports"
            lines.append(f"  cluster {cluster.name}: {SCHEDULER_NAMES[cluster.scheduler]}, runner {cluster.runner}, "
                         f"tunnel {cluster.tunnel}, partitions: {partitions}")
        for profile in self.catalog.profiles:
            who = ("groups " + ", ".join(profile.groups)) if profile.groups else "everyone"
            editable = ", ".join(profile.user_editable) or "nothing"
            lines.append(f"  profile {profile.name}: on {profile.cluster.name}, for {who}; "
                         f"users may change: {editable}")
        for role in self.config.JupyterHub.get("load_roles", []):
            who = ", ".join([*(f"group {g}" for g in role.get("groups", ())), *role.get("users", ())])
            members = sorted({scope.split("!group=")[1] for scope in role["scopes"] if "!group=" in scope})
            lines.append(f"  role {role['name']}: {who} may start, stop and open the servers of the members of "
                         + ", ".join(members))
        if self.beside:
            lines.append(f"  also loaded after it (not checked here): {self.beside}")
        return "\n".join(lines)

    def _authenticator(self) -> str:
        chosen = self.config.JupyterHub.get("authenticator_class")
        return next((name for name, path in AUTHENTICATORS.items() if path == chosen), "demo (default)")


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def load(path: str, *, jupyterhub_config: str | None = None) -> Settings:
    """Read and check the TOML file at `path`; ConfigError lists every problem."""
    reader = Reader(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError([Problem(path, "(file)", f"cannot read it: {err.strerror}")]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([Problem(path, "(file)", f"not valid TOML: {err}")]) from None
    sections = reader.table(data, "", SECTIONS)
    config = Config()
    hub = reader.table(sections.get("hub", {}), "hub", tuple(_hub_settings()))
    authenticator = _hub(reader, hub, config)
    if "ldap" in sections:
        if authenticator != "ldap":
            reader.problem("ldap", 'an [ldap] table needs hub.authenticator = "ldap"', allowed='set hub.authenticator '
                           '= "ldap", or remove the [ldap] table')
        _ldap(reader, sections["ldap"], config)
    elif authenticator == "ldap":
        reader.problem("ldap", 'missing: hub.authenticator = "ldap" needs an [ldap] table', allowed="server_urls, "
                       "bind_dn_templates or user_search_base, ...")
    if authenticator == "ldap" and "ldap" in sections and not reader.problems:
        _ldap_together(reader, config)
    if "roles" in sections:
        _roles(reader, sections["roles"], config, authenticator)
    _spawner(reader, sections.get("spawner", {}), config)
    catalog = _catalog(reader, sections, config)
    _files(reader, config, catalog)
    reader.check()
    assert catalog is not None
    beside = jupyterhub_config or os.path.join(os.path.dirname(os.path.abspath(path)), "jupyterhub_config.py")
    return Settings(path, config, catalog, beside if os.path.isfile(beside) else None)


def check(path: str, *, jupyterhub_config: str | None = None) -> tuple[int, str]:
    """`hpchub --check-config`: (exit status, what to print)."""
    try:
        settings = load(path, jupyterhub_config=jupyterhub_config)
    except ConfigError as err:
        count = len(err.problems)
        return 1, f"{err}\n{path}: {count} problem{'s' if count > 1 else ''}; hpchub would not start."
    return 0, settings.summary()


# --- sections -------------------------------------------------------------------------------------

def _hub(reader: Reader, hub: Mapping[str, Any], config: Config) -> str:
    """[hub] into `config`; returns the authenticator's short name."""
    authenticator = reader.get(hub, "hub", "authenticator", one_of(tuple(AUTHENTICATORS)), "demo")
    if "authenticator" in hub and authenticator:
        config.JupyterHub.authenticator_class = AUTHENTICATORS[authenticator]
    for name in ("bind_url", "public_url"):
        url = reader.get(hub, "hub", name, _url)
        if url:
            config.JupyterHub[name] = url
    for name in ("db_url", "ledger_url"):
        url = reader.get(hub, "hub", name, _database_url, secret=True)
        if url:
            target = _hub_settings()[name].traitlet.split(".")
            config[target[0]][target[1]] = url
    for name in ("ssl_cert", "ssl_key", "data_dir"):
        value = reader.get(hub, "hub", name, absolute_path)
        if value:
            cls, trait = _hub_settings()[name].traitlet.split(".")
            config[cls][trait] = value
    if ("ssl_cert" in hub) != ("ssl_key" in hub):
        missing = "ssl_key" if "ssl_cert" in hub else "ssl_cert"
        reader.problem(f"hub.{missing}", "missing: ssl_cert and ssl_key go together",
                       allowed="the path of the PEM " + ("private key" if missing == "ssl_key" else "certificate"))
    bind = config.JupyterHub.get("bind_url", "")
    if bind.startswith("https:") and "ssl_cert" not in hub:
        reader.problem("hub.bind_url", "https needs hub.ssl_cert and hub.ssl_key (or serve http behind a proxy that "
                       "terminates TLS, and set hub.public_url)", bind)
    for name in ("admin_users", "allowed_users"):
        users = reader.get(hub, "hub", name, _names)
        if users is not None:
            config.Authenticator[name] = set(users)
    for name in ("admin_groups", "allowed_groups"):
        groups = reader.get(hub, "hub", name, _names)
        if groups is None:
            continue
        if authenticator not in _GROUP_AUTHENTICATORS:
            reader.problem(f"hub.{name}", f"groups need an authenticator that knows them; "
                           f"hub.authenticator is {show(authenticator)}", list(groups), '"ldap" or "pam"')
            continue
        config[_GROUP_AUTHENTICATORS[authenticator]][name] = set(groups)
    for name, cls in (("enable_auth_state", "Authenticator"), ("admin_access", "JupyterHub")):
        value = reader.get(hub, "hub", name, _bool)
        if value is not None:
            config[cls][name] = value
    for name, lowest in (("cull_idle_timeout", 0), ("cull_every", 1), ("cull_max_age", 0)):
        seconds = reader.get(hub, "hub", name, whole(lowest))
        if seconds is not None:
            config.HpcHub[name] = seconds
    return authenticator or "demo"


def _ldap(reader: Reader, table: Any, config: Config) -> None:
    from hpchub.ldap import LDAPAuthenticator

    traits = LDAPAuthenticator.class_traits(config=True)
    data = reader.table(table, "ldap", (*_LDAP_TRAITS, LDAP_PASSWORD_FILE))
    for name, value in data.items():
        if name == LDAP_PASSWORD_FILE:
            continue
        checked = reader.get(data, "ldap", name, lambda v, t=traits[name]: trait_value(t, v))
        if checked is not None:
            config.LDAPAuthenticator[name] = checked
    password_file = reader.get(data, "ldap", LDAP_PASSWORD_FILE, absolute_path)
    if password_file:
        try:
            with open(password_file) as f:
                config.LDAPAuthenticator.search_bind_password = f.read().strip()
        except OSError as err:
            reader.problem(f"ldap.{LDAP_PASSWORD_FILE}", f"cannot read it: {err.strerror}", password_file,
                           "a file the hub can read, holding only the password")


def _ldap_together(reader: Reader, config: Config) -> None:
    """The LDAP settings checked together, by the authenticator itself (no connection is made)."""
    from hpchub.ldap import LDAPAuthenticator

    try:
        LDAPAuthenticator(config=config)
    except (TraitError, ValueError) as err:
        message = str(err).replace("LDAPAuthenticator configuration: ", "")
        reader.problem("ldap", message, allowed="see docs/ldap.md")


ROLE_KEYS = ("description", "groups", "users", "member_groups")
#: JupyterHub's own roles, and the idle culler's: a [roles.NAME] table may not redefine them
RESERVED_ROLES = ("admin", "user", "server", "token", "hpchub-idle-culler")


def teacher_scopes(member_groups: Sequence[str]) -> list[str]:
    """What a [roles.NAME] grants over the members of `member_groups`: see them (admin page, REST API),
    start and stop their servers, and open them (JupyterHub's `!group=` filters)."""
    per_group = ("list:users", "read:users", "read:servers", "servers", "access:servers")
    return ["admin-ui", *(f"{scope}!group={group}" for group in member_groups for scope in per_group)]


def _roles(reader: Reader, table: Any, config: Config, authenticator: str) -> None:
    """[roles.NAME] tables (teachers: the groups or users given the role, over the members of
    member_groups) into JupyterHub.load_roles."""
    if not isinstance(table, Mapping):
        reader.problem("roles", "expected [roles.NAME] tables", allowed="one [roles.NAME] table per role")
        return
    roles = []
    for name, role in table.items():
        key = f"roles.{name}"
        if not SLUG.fullmatch(name) or name in RESERVED_ROLES:
            reader.problem(key, "not a name for a role" if name not in RESERVED_ROLES else "JupyterHub's or hpchub's "
                           "own role: choose another name", name, SLUG_ALLOWED + "; not " + ", ".join(RESERVED_ROLES))
            continue
        data = reader.table(role, key, ROLE_KEYS)
        description = reader.get(data, key, "description", text, "")
        holders = {kind: list(reader.get(data, key, kind, name_list, ())) for kind in ("groups", "users")}
        members = reader.get(data, key, "member_groups", name_list, (), required=True,
                             allowed='the groups whose members\' servers the role manages, e.g. ["course101"]')
        if "member_groups" in data and not members:
            reader.problem(f"{key}.member_groups", "empty: the role would grant nothing", [],
                           'at least one group, e.g. ["course101"]')
        if not any(holders.values()) and isinstance(role, Mapping):
            reader.problem(key, "nobody has this role", allowed="groups = [...] (e.g. the teachers' group) and/or "
                           "users = [...]")
        if members:
            roles.append({"name": name, "description": description or "manage the servers of the members of "
                          + ", ".join(members), "scopes": teacher_scopes(members),
                          **{kind: names for kind, names in holders.items() if names}})
    if roles:
        config.JupyterHub.load_roles = roles
        if authenticator == "ldap":
            # the directory's groups become the hub's at each login: the `!group=` filters need them
            config.Authenticator.manage_groups = True


def _spawner(reader: Reader, table: Any, config: Config) -> None:
    from batchspawner import BatchSpawner

    traits = BatchSpawner.class_traits(config=True)
    data = reader.table(table, "spawner", tuple(_SPAWNER_TRAITS))
    for name in data:
        value = reader.get(data, "spawner", name, lambda v, t=traits[name]: trait_value(t, v))
        if value is not None:
            config[_SPAWNER_TRAITS[name]][name] = value


def _catalog(reader: Reader, sections: Mapping[str, Any], config: Config) -> Catalog | None:
    clusters = sections.get("clusters", {})
    profiles = sections.get("profiles", {})
    if not isinstance(profiles, Mapping):
        reader.problem("profiles", "expected [profiles.NAME] tables", allowed="one [profiles.NAME] table per profile")
        profiles = {}
    as_list = []
    for name, table in profiles.items():
        if isinstance(table, Mapping) and "name" in table:
            reader.problem(f"profiles.{name}.name", "the table's name is the profile's name: remove this key",
                           table["name"])
            continue
        as_list.append({"name": name, **table} if isinstance(table, Mapping) else table)
    try:
        catalog = parse_catalog(clusters, as_list, source=reader.source)
    except ConfigError as err:
        reader.problems += err.problems
        return None
    if catalog.clusters:
        config.JupyterHub.spawner_class = "batchspawner.BatchSpawner"
        config.BatchSpawner.clusters = {name: dict(table) for name, table in clusters.items()}
        config.BatchSpawner.profiles = as_list
        if not catalog.profiles:
            reader.problem("profiles", "clusters are configured but no profile uses them",
                           allowed="at least one [profiles.NAME] table with cluster = " + choices(catalog.clusters))
    return catalog


def _files(reader: Reader, config: Config, catalog: Catalog | None) -> None:
    """Files named in the configuration exist and can be used by the hub."""
    hub = config.JupyterHub
    if "ssl_cert" in hub and "ssl_key" in hub:
        readable = [_readable(reader, f"hub.{name}", hub[name]) for name in ("ssl_cert", "ssl_key")]
        if all(readable):
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(hub.ssl_cert, hub.ssl_key)
            except ssl.SSLError as err:
                reader.problem("hub.ssl_cert", f"{hub.ssl_cert} and {hub.ssl_key} are not a PEM certificate and "
                               f"its private key: {err.reason or err}", allowed="PEM files; the key unencrypted")
    ca_file = config.LDAPAuthenticator.get("ca_file") if "LDAPAuthenticator" in config else None
    if ca_file:
        _readable(reader, "ldap.ca_file", ca_file)
    for cluster in (catalog.clusters.values() if catalog else ()):
        key = f"clusters.{cluster.name}"
        if cluster.ssh:
            _readable(reader, f"{key}.ssh.known_hosts", cluster.ssh.known_hosts)
            for path in cluster.ssh.client_keys:
                _readable(reader, f"{key}.ssh.client_keys", path)
        for directory in cluster.job_template_dirs:
            if not os.path.isdir(directory):
                reader.problem(f"{key}.job_template_dirs", "not a directory", directory,
                               "directories of job templates (*.j2)")


def _readable(reader: Reader, key: str, path: str) -> bool:
    if not os.path.isfile(path):
        reader.problem(key, "no such file", path, "the path of an existing file")
        return False
    if not os.access(path, os.R_OK):
        reader.problem(key, "the hub cannot read this file", path, "a file readable by the hub's user")
        return False
    return True


# --- value checks ---------------------------------------------------------------------------------

def trait_value(trait: TraitType, value: Any) -> Any:
    """A TOML value checked against the type and range of the traitlet it sets (ValueError otherwise)."""
    if isinstance(trait, Bool):
        return _bool(value)
    if isinstance(trait, Enum):
        return one_of(tuple(trait.values))(value)
    if isinstance(trait, (Integer, Float)):
        whole = isinstance(trait, Integer)
        kinds = (int,) if whole else (int, float)
        low, high = (bound if bound not in (float("inf"), float("-inf")) else None
                     for bound in (getattr(trait, "min", None), getattr(trait, "max", None)))
        allowed = ("a whole number" if whole else "a number") + (
            f" from {low:g}" if low is not None else "") + (f" to {high:g}" if high is not None else "")
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"expected {'a whole number' if whole else 'a number'}", allowed)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError("out of range", allowed)
        return value
    if isinstance(trait, (List, Set)):
        if not isinstance(value, list):
            raise ValueError("expected a list", 'a list, e.g. ["a", "b"]')
        inner = trait._trait
        return [trait_value(inner, item) if inner is not None else item for item in value]
    if isinstance(trait, Unicode):
        if not isinstance(value, str):
            raise ValueError("expected text", "text in quotes")
        return value
    raise ValueError("this key cannot be set from TOML")


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false", "true, false")
    return value


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of names", '["alice", "bob"]')
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected text", '"http://host:port/" or "https://host:port/"')
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as err:
        raise ValueError(str(err), '"http://host:port/" or "https://host:port/"') from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL", '"http://host:port/" or "https://host:port/"')
    return value


def _database_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected text", "an SQLAlchemy URL")
    try:
        make_url(value)
    except ArgumentError:
        raise ValueError("not a database URL", '"sqlite:////var/lib/hpchub/x.sqlite" or '
                         '"postgresql+psycopg://user@host/db"') from None
    return value
