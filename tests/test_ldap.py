"""hpchub.ldap against the real test directory of docker/ldap/ldap.sh: two slapd instances (a, b) with
the same entries. Logins, refusals, injection attempts, groups, TLS, failover, a directory that is down
or hangs (b stopped with SIGSTOP), and a real hub that keeps answering while a login hangs."""
from __future__ import annotations

import asyncio
import html
import logging
import os
import pwd
import re
import secrets
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from ldap3 import NONE, Connection, Server, Tls
from ldap3.utils.dn import parse_dn
from ldap3.utils.log import EXTENDED, OFF, set_library_log_detail_level, set_library_log_hide_sensitive_data
from tornado import web
from traitlets import TraitError

from conftest import require_service
from helpers import alive
from hubtools import Browser, Hub, singleuser_processes, spawn_until_ready, start_hub
from hpchub.ldap import UNAVAILABLE, LDAPAuthenticator, PosixAccount, auth_state_hook, dn_value, posix_account

BASE = "dc=hpchub,dc=test"
CA = "/etc/hpchub-test-ldap/tls/ca.crt"
A, B = "ldap://127.0.0.1:10389", "ldap://127.0.0.1:10390"
A_LDAPS = "ldaps://127.0.0.1:10636"
READER_DN, READER_PW = f"cn=hub-reader,ou=services,{BASE}", "Reader-ldap-pw-5"
PASSWORDS = {"alice": "Alice-ldap-pw-1", "bob": "Bob-ldap-pw-2", "carol": "Carol-ldap-pw-3", "dave": "Dave-ldap-pw-4"}
RUN_DIR = Path("/run/hpchub-test-ldap")
LDAP_SH = Path(__file__).resolve().parents[1] / "docker" / "ldap" / "ldap.sh"
SEARCH = dict(server_urls=[A], ca_file=CA, user_search_base=f"ou=people,{BASE}", search_bind_dn=READER_DN,
              search_bind_password=READER_PW, group_search_base=f"ou=groups,{BASE}",
              allowed_groups={"researchers", "hpc-users"}, admin_groups={"hub-admins"})
INJECTIONS = ["*", "admin)(uid=*", "*)(uid=*", "alice)(|(objectClass=*", "\x00", "alice\x00", "al*",
              f"uid=alice,ou=people,{BASE}", "alice,ou=people", "alice+uid=bob", "\\2a", "#alice", " "]


def _directory_answers() -> bool:
    try:
        for url in (A, B):
            tls = Tls(ca_certs_file=CA, validate=ssl.CERT_REQUIRED)
            server = Server(url, get_info=NONE, connect_timeout=3, tls=tls)
            conn = Connection(server, READER_DN, READER_PW, receive_timeout=3)
            conn.open()
            conn.start_tls()
            if not conn.bind():
                return False
            conn.unbind()
    except Exception:  # noqa: BLE001 - any failure means: not available
        return False
    return True


@pytest.fixture(scope="session")
def directory() -> None:
    require_service("the test LDAP directory", _directory_answers(), "run `docker/ldap/ldap.sh start` as root")


def make(**settings) -> LDAPAuthenticator:
    return LDAPAuthenticator(**{**SEARCH, **settings})


async def login(auth: LDAPAuthenticator, username: str, password: str) -> dict | None:
    return await auth.get_authenticated_user(None, {"username": username, "password": password})


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]   # nothing listens once closed


def slapd_pid(instance: str) -> int:
    return int((RUN_DIR / f"{instance}.pid").read_text())


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@contextmanager
def b_stopped():
    """Instance b accepts connections (the kernel completes them) but never answers."""
    pid = slapd_pid("b")
    assert alive(pid) and process_state(pid) != "T"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Recorder:
    """Wraps a Directory's connect and search to see what reached the server."""

    def __init__(self, auth: LDAPAuthenticator):
        self.binds: list[str] = []
        self.searches: list[tuple[str, int]] = []
        directory = auth.directory
        connect, search_on = directory.connect, directory._search_on

        def recording_connect(dn, password):
            self.binds.append(dn)
            return connect(dn, password)

        def recording_search(conn, base, search_filter, *args):
            found = search_on(conn, base, search_filter, *args)
            self.searches.append((search_filter, len(found)))
            return found

        directory.connect, directory._search_on = recording_connect, recording_search


def test_start_again_changes_nothing_and_resumes_a_frozen_instance(directory):
    pids = {name: slapd_pid(name) for name in ("a", "b")}
    with b_stopped():
        started = time.monotonic()
        result = subprocess.run([str(LDAP_SH), "start"], capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        took = time.monotonic() - started
        b_state = process_state(pids["b"])
    assert result.returncode == 0, result.stderr
    assert "was stopped (SIGSTOP): resuming it" in result.stderr and "nothing to start" in result.stdout
    assert b_state != "T" and took < 10
    assert {name: slapd_pid(name) for name in ("a", "b")} == pids
    status = subprocess.run([str(LDAP_SH), "status"], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0 and status.stdout.count(": running (pid") == 2
    assert os.stat(CA).st_mode & 0o004, "the CA certificate must be world-readable"


# --- logging in and refusals -----------------------------------------------------------------------

@pytest.mark.asyncio
async def test_good_password_logs_in_with_the_posix_account(directory):
    auth = make()
    for user in ("alice", "bob"):
        model = await login(auth, user, PASSWORDS[user])
        assert model is not None and model["name"] == user
        unix = pwd.getpwnam(user)
        state = model["auth_state"]
        assert (state["uid"], state["uidNumber"], state["gidNumber"], state["homeDirectory"], state["loginShell"]) == (
            user, unix.pw_uid, unix.pw_gid, unix.pw_dir, "/bin/bash")
        assert state["dn"] == f"uid={user},ou=people,{BASE}"
        account = posix_account(state)
        assert account == PosixAccount(user, unix.pw_uid, unix.pw_gid, unix.pw_dir, "/bin/bash", tuple(state["groups"]))


@pytest.mark.asyncio
async def test_usernames_are_normalised(directory):
    auth = make()
    for typed in ("  Alice ", "ALICE", "alice\t"):
        model = await login(auth, typed, PASSWORDS["alice"])
        assert model is not None and model["name"] == "alice", typed


@pytest.mark.asyncio
async def test_wrong_password_unknown_user_and_blank_password_are_refused_alike(directory):
    auth = make()
    recorder = Recorder(auth)
    for user, password in [("alice", "wrong"), ("alice", PASSWORDS["bob"]), ("nobody", "whatever1"),
                           ("alice", ""), ("alice", "   "), ("alice", "\t\n")]:
        assert await login(auth, user, password) is None, (user, password)
    # blank passwords never reach a bind (an empty password is an anonymous bind on many servers)
    assert f"uid=alice,ou=people,{BASE}" in recorder.binds
    assert len([dn for dn in recorder.binds if dn != READER_DN]) == 2


@pytest.mark.asyncio
async def test_injection_attempts_never_log_in(directory):
    strict = make()
    for name in INJECTIONS:
        for password in (PASSWORDS["alice"], "*"):
            assert await login(strict, name, password) is None, name
    # with any username allowed, escaping alone must hold: no login, never more than one entry matched
    searching = make(username_pattern=r".*")
    recorder = Recorder(searching)
    for name in INJECTIONS:
        for password in (PASSWORDS["alice"], "*"):
            assert await login(searching, name, password) is None, name
    assert recorder.searches and all(count == 0 for _, count in recorder.searches), recorder.searches
    assert ("(&(objectClass=posixAccount)(uid=admin\\29\\28uid=\\2a))", 0) in recorder.searches
    assert set(recorder.binds) == {READER_DN}       # no filter matched an entry to bind as
    binding = make(username_pattern=r".*", user_search_base="", search_bind_dn="", search_bind_password="",
                   bind_dn_templates=[f"uid={{username}},ou=people,{BASE}"])
    recorder = Recorder(binding)
    for name in INJECTIONS:
        for password in (PASSWORDS["alice"], "*"):
            assert await login(binding, name, password) is None, name
    for dn in recorder.binds:                        # the name stayed inside the first RDN's value
        assert [(attribute, separator) for attribute, _, separator in parse_dn(dn)] == [
            ("uid", ","), ("ou", ","), ("dc", ","), ("dc", "")], dn
    assert len(recorder.binds) == 2 * len([n for n in INJECTIONS if n.strip()])


def test_values_are_escaped_in_dns():
    assert dn_value("alice,ou=people") == "alice\\,ou\\=people"
    assert dn_value("a\x00b") == "a\\00b"
    assert dn_value("#x ") == "\\#x\\ "


# --- groups and admins -----------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_allowed_groups_and_admin_group(directory):
    auth = make()
    alice = await login(auth, "alice", PASSWORDS["alice"])       # posixGroup researchers (memberUid)
    bob = await login(auth, "bob", PASSWORDS["bob"])             # groupOfNames hpc-users (member)
    dave = await login(auth, "dave", PASSWORDS["dave"])          # groupOfNames hub-admins
    assert alice["admin"] is False and "researchers" in alice["auth_state"]["groups"]
    assert bob["admin"] is False and {"hpc-users", "gpu-users"} <= set(bob["auth_state"]["groups"])
    assert dave["admin"] is True
    with pytest.raises(web.HTTPError) as refused:                # carol: right password, no allowed group
        await login(auth, "carol", PASSWORDS["carol"])
    assert refused.value.status_code == 403 and "not in a group" in refused.value.log_message
    only_users = make(allowed_groups=set(), admin_groups=set(), allowed_users={"alice"})
    assert await login(only_users, "bob", PASSWORDS["bob"]) is None
    # by DN too, in any case
    by_dn = make(allowed_groups={f"CN=Staff,ou=groups,{BASE}"}, admin_groups=set())
    assert (await login(by_dn, "carol", PASSWORDS["carol"]))["admin"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize("styles, base, expected", [
    (["memberOf"], "", {"bob": {"hpc-users"}, "alice": set()}),
    (["member"], f"ou=groups,{BASE}", {"bob": {"hpc-users"}, "alice": set()}),
    (["uniqueMember"], f"ou=groups,{BASE}", {"bob": {"gpu-users"}, "alice": set()}),
    (["memberUid"], f"ou=groups,{BASE}", {"bob": set(), "alice": {"researchers"}}),
])
async def test_each_membership_style(directory, styles, base, expected):
    auth = make(group_membership=styles, group_search_base=base, allowed_groups=set(), allow_all=True)
    for user, groups in expected.items():
        assert set((await login(auth, user, PASSWORDS[user]))["auth_state"]["groups"]) == groups, (styles, user)


@pytest.mark.asyncio
async def test_nested_groups_are_optional(directory):
    flat = make(allowed_groups={"lab-all"})
    with pytest.raises(web.HTTPError):
        await login(flat, "carol", PASSWORDS["carol"])
    nested = make(allowed_groups={"lab-all"}, nested_group_depth=1)
    carol = await login(nested, "carol", PASSWORDS["carol"])
    assert {"lab-physics", "lab-all", "staff"} <= set(carol["auth_state"]["groups"])


@pytest.mark.asyncio
async def test_groups_for_jupyterhub_when_managed(directory):
    model = await login(make(manage_groups=True), "dave", PASSWORDS["dave"])
    assert model["groups"] == ["hpc-users", "hub-admins", "researchers"]
    assert "groups" not in await login(make(), "dave", PASSWORDS["dave"])


# --- bind DN templates, TLS modes ------------------------------------------------------------------

@pytest.mark.asyncio
async def test_bind_dn_templates_without_a_service_account(directory):
    auth = make(user_search_base="", search_bind_dn="", search_bind_password="",
                bind_dn_templates=[f"uid={{username}},ou=staff,{BASE}", f"uid={{username}},ou=people,{BASE}"])
    recorder = Recorder(auth)
    alice = await login(auth, "alice", PASSWORDS["alice"])
    assert alice["auth_state"]["uidNumber"] == pwd.getpwnam("alice").pw_uid
    assert "researchers" in alice["auth_state"]["groups"]            # searched as alice herself
    assert READER_DN not in recorder.binds
    assert await login(auth, "alice", "wrong") is None
    assert await login(auth, "nobody", "whatever1") is None


@pytest.mark.asyncio
async def test_ldaps_and_plain_on_request(directory):
    assert await login(make(tls_mode="ldaps", server_urls=[A_LDAPS]), "bob", PASSWORDS["bob"])
    assert await login(make(tls_mode="plain", allow_plaintext=True), "bob", PASSWORDS["bob"])
    with pytest.raises(ValueError, match="allow_plaintext"):
        make(tls_mode="plain")


@pytest.mark.asyncio
async def test_certificates_are_verified(directory, caplog):
    for settings in (dict(), dict(tls_mode="ldaps", server_urls=[A_LDAPS])):
        auth = make(ca_file="/etc/ssl/certs/ca-certificates.crt", **settings)
        with pytest.raises(web.HTTPError) as failed:
            await login(auth, "alice", PASSWORDS["alice"])
        assert failed.value.status_code == 503 and failed.value.log_message == UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_configuration_errors_say_what_to_change():
    with pytest.raises(TraitError, match="not ldap://host"):
        make(server_urls=["http://ldap.example.org"])
    with pytest.raises(TraitError, match="not ldap://host"):
        make(server_urls=["ldap://ldap.example.org/dc=example"])
    with pytest.raises(ValueError, match="set server_urls"):
        make(server_urls=[])
    with pytest.raises(ValueError, match='does not fit tls_mode .starttls.: use ldap://'):
        make(server_urls=[A_LDAPS])
    with pytest.raises(ValueError, match="either bind_dn_templates"):
        make(bind_dn_templates=["uid={username},ou=people,dc=x"])
    with pytest.raises(TraitError, match="has no {username}"):
        make(bind_dn_templates=["uid=alice,ou=people,dc=x"])
    with pytest.raises(TraitError, match="cannot read"):
        make(ca_file="/nonexistent/ca.crt")
    with pytest.raises(TraitError):
        make(receive_timeout=0)
    with pytest.raises(TraitError):
        make(tls_mode="ssl")
    with pytest.raises(ValueError, match="cannot be found"):
        make(group_search_base="", group_membership=["member"])
    with pytest.raises(ValueError, match="go together"):
        make(search_bind_password="")


@pytest.mark.asyncio
async def test_service_account_and_search_base_mistakes_are_named_in_the_log(directory, caplog):
    for settings, problem in [(dict(search_bind_password="wrong"), "refuses the service account 'cn=hub-reader"),
                              (dict(user_search_base=f"ou=nobody,{BASE}"),
                               f"the search base 'ou=nobody,{BASE}' does not exist"),
                              (dict(group_search_base=f"ou=nogroups,{BASE}"), "does not exist")]:
        with pytest.raises(web.HTTPError) as failed:
            await login(make(**settings), "alice", PASSWORDS["alice"])
        assert failed.value.status_code == 503 and failed.value.log_message == UNAVAILABLE
        assert problem in caplog.text, problem


# --- failover, a directory down or hanging -----------------------------------------------------------

@pytest.mark.asyncio
async def test_failover_when_the_first_server_refuses(directory):
    auth = make(server_urls=[f"ldap://127.0.0.1:{refused_port()}", A])
    started = time.monotonic()
    assert await login(auth, "alice", PASSWORDS["alice"])
    assert time.monotonic() - started < 1.0


@pytest.mark.asyncio
async def test_failover_when_the_first_server_hangs(directory):
    auth = make(server_urls=[B, A], receive_timeout=1)
    with b_stopped():
        started = time.monotonic()
        assert await login(auth, "alice", PASSWORDS["alice"])
        first = time.monotonic() - started
        started = time.monotonic()
        assert await login(auth, "bob", PASSWORDS["bob"])
        second = time.monotonic() - started
    assert 1.0 <= first < 3.0, first       # one receive timeout on b, then a
    assert second < 0.5, second            # b failed recently: a first


@pytest.mark.asyncio
async def test_directory_down_fails_fast_with_a_clear_error(directory, caplog):
    ports = [refused_port(), refused_port()]
    auth = make(server_urls=[f"ldap://127.0.0.1:{p}" for p in ports])
    started = time.monotonic()
    with pytest.raises(web.HTTPError) as failed:
        await login(auth, "alice", PASSWORDS["alice"])
    assert time.monotonic() - started < 1.0
    assert failed.value.status_code == 503 and failed.value.log_message == UNAVAILABLE
    for port in ports:
        assert f"ldap://127.0.0.1:{port}: LDAPSocketOpenError" in caplog.text


@pytest.mark.asyncio
async def test_hanging_directory_fails_within_the_timeouts(directory, caplog):
    auth = make(server_urls=[B], receive_timeout=1)
    with b_stopped():
        started = time.monotonic()
        with pytest.raises(web.HTTPError) as failed:
            await login(auth, "alice", PASSWORDS["alice"])
        receive = time.monotonic() - started
        slow = make(server_urls=[B], receive_timeout=10, login_timeout=1.5)
        started = time.monotonic()
        with pytest.raises(web.HTTPError):
            await login(slow, "alice", PASSWORDS["alice"])
        overall = time.monotonic() - started
    assert failed.value.status_code == 503
    assert 1.0 <= receive < 2.5, receive
    assert 1.5 <= overall < 2.5, overall
    assert "no answer within login_timeout (1.5 s)" in caplog.text


@pytest.mark.asyncio
async def test_logins_do_not_block_the_event_loop(directory):
    auth = make(server_urls=[B], receive_timeout=2)
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    with b_stopped():
        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(login(auth, "alice", PASSWORDS["alice"]) for _ in range(3)),
                                       return_exceptions=True)
        task.cancel()
    assert all(isinstance(r, web.HTTPError) for r in results)
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 20 and max(gaps) < 0.3, max(gaps)


# --- connections are reused --------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_service_connection_is_reused_and_rebound_when_broken(directory):
    auth = make()
    recorder = Recorder(auth)
    for user in ("alice", "bob", "dave", "alice", "bob"):
        assert await login(auth, user, PASSWORDS[user])
    assert recorder.binds.count(READER_DN) == 1
    conn, _ = auth.directory._idle.get_nowait()
    conn.socket.shutdown(socket.SHUT_RDWR)        # the server went away under the pooled connection
    auth.directory._idle.put((conn, A))
    assert await login(auth, "alice", PASSWORDS["alice"])
    assert recorder.binds.count(READER_DN) == 2


# --- the spawner's side ------------------------------------------------------------------------------

def test_posix_account_and_hook():
    state = {"uid": "alice", "uidNumber": 1001, "gidNumber": "1001", "homeDirectory": "/home/alice",
             "loginShell": "/bin/bash", "groups": ["researchers"]}
    assert posix_account(state) == PosixAccount("alice", 1001, 1001, "/home/alice", "/bin/bash", ("researchers",))
    assert posix_account(None) is None and posix_account({"uid": "x"}) is None

    class Spawner:
        pass

    spawner = Spawner()
    auth_state_hook(spawner, state)
    assert spawner.auth_state_account.uid == 1001
    auth_state_hook(spawner, None)
    assert spawner.auth_state_account is None
    for bad in ({"uidNumber": 0}, {"gidNumber": 0}, {"homeDirectory": "home"}, {"uidNumber": "x"}):
        with pytest.raises(ValueError):
            posix_account({**state, **bad})


# --- no password in any log ------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_passwords_never_logged(directory):
    logger = logging.getLogger("test_ldap.capture")
    logger.setLevel(logging.DEBUG)
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    set_library_log_hide_sensitive_data(True)
    set_library_log_detail_level(EXTENDED)        # ldap3's own logging, as verbose as it gets
    try:
        auth = make(log=logger)
        assert await login(auth, "alice", PASSWORDS["alice"])
        assert await login(auth, "alice", PASSWORDS["bob"]) is None
        assert await login(auth, "bob", PASSWORDS["alice"] + " ") is None
        with pytest.raises(web.HTTPError):
            await login(make(log=logger, server_urls=[f"ldap://127.0.0.1:{refused_port()}"]), "dave", PASSWORDS["dave"])
        with pytest.raises(web.HTTPError):
            await login(make(log=logger, ca_file="/etc/ssl/certs/ca-certificates.crt"), "carol", PASSWORDS["carol"])
    finally:
        set_library_log_detail_level(OFF)
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = "\n".join(records)
    assert "LDAP password accepted for 'alice'" in text and "wrong password" in text and len(records) > 50
    for secret in (*PASSWORDS.values(), READER_PW):
        assert secret not in text


# --- a real hub ------------------------------------------------------------------------------------

def hub_ldap_config(servers: list[str], **settings) -> str:
    lines = [
        'c.JupyterHub.authenticator_class = "ldap"',
        'c.JupyterHub.log_level = "DEBUG"',
        "c.Authenticator.enable_auth_state = True",
        "c.Authenticator.manage_groups = True",
        'c.JupyterHub.load_roles[0]["scopes"].append("admin:auth_state")',
        f"c.LDAPAuthenticator.server_urls = {servers!r}",
    ]
    lines += [f"c.LDAPAuthenticator.{name} = {value!r}" for name, value in {**SEARCH, **settings}.items()
              if name != "server_urls"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def ldap_hub(tmp_path: Path, directory, proxy_installed):
    hubs: list[Hub] = []

    def start(servers: list[str], spawner_lines: tuple[str, ...] = (), **settings) -> Hub:
        config = hub_ldap_config(servers, **settings) + "".join(line + "\n" for line in spawner_lines)
        hub = start_hub(tmp_path / f"hub{len(hubs)}", config,
                        env={"JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32)})
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


def post_login(hub: Hub, username: str, password: str) -> tuple[requests.Response, str]:
    """The login form as a browser submits it: the response and the error message it shows."""
    session = requests.Session()
    page = session.get(f"{hub.url}/hub/login", timeout=10)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    response = session.post(f"{hub.url}/hub/login", data={"username": username, "password": password, "_xsrf": xsrf},
                            allow_redirects=False, timeout=60)
    error = re.search(r'<p class="login_error">\s*(.*?)\s*</p>', response.text, re.S)
    return response, html.unescape(error.group(1)) if error else ""


def test_hub_logs_users_in_from_the_directory(ldap_hub):
    hub = ldap_hub([A])
    for user in ("alice", "bob", "dave"):
        response, _ = post_login(hub, user, PASSWORDS[user])
        assert response.status_code == 302, (user, response.status_code)
    messages = set()
    for user, password in [("alice", "wrong"), ("nobody", "whatever1"), ("alice", ""), ("*", "*"),
                           ("admin)(uid=*", PASSWORDS["alice"])]:
        response, message = post_login(hub, user, password)
        assert response.status_code == 403, (user, response.status_code)
        messages.add(message)
    assert messages == {"Invalid username or password"}
    response, message = post_login(hub, "carol", PASSWORDS["carol"])
    assert response.status_code == 403 and "not in a group that may use this hub" in message

    dave = hub.api("GET", "/users/dave").json()
    assert dave["admin"] is True and set(dave["groups"]) == {"hpc-users", "hub-admins", "researchers"}
    assert dave["auth_state"]["uidNumber"] == 20004 and dave["auth_state"]["homeDirectory"] == "/home/dave"
    alice = hub.api("GET", "/users/alice").json()
    assert alice["admin"] is False and alice["groups"] == ["researchers"]
    assert posix_account(alice["auth_state"]).uid == pwd.getpwnam("alice").pw_uid

    log = hub.log()
    assert "LDAP password accepted for 'alice': uid=alice" in log and "\n[D " in log
    for secret in (*PASSWORDS.values(), READER_PW):
        assert secret not in log


def test_hub_keeps_answering_while_a_login_hangs(ldap_hub):
    hub = ldap_hub([B], receive_timeout=3, login_timeout=10.0)
    results: list[tuple[float, int, str]] = []

    def log_in(user: str) -> None:
        started = time.monotonic()
        response, message = post_login(hub, user, PASSWORDS[user])
        results.append((time.monotonic() - started, response.status_code, message))

    latencies = []
    with b_stopped():
        threads = [threading.Thread(target=log_in, args=(user,)) for user in ("alice", "bob")]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            started = time.monotonic()
            assert requests.get(f"{hub.url}/hub/api/", timeout=5).status_code == 200
            assert hub.api("GET", "/users").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        for thread in threads:
            thread.join(timeout=30)
    assert len(results) == 2
    for elapsed, status, message in results:
        assert status == 503 and message == UNAVAILABLE
        assert 3.0 <= elapsed < 6.0, elapsed       # one receive timeout, then the clear error
    assert len(latencies) >= 15 and max(latencies) < 0.5, (len(latencies), max(latencies))
    assert re.search(r"LDAP login for 'alice' failed after 3\.\d s: ldap://127\.0\.0\.1:10390: "
                     r"LDAPSocketReceiveError", hub.log())


def test_a_directory_user_spawns_a_job_as_the_directorys_account(ldap_hub, test_users):
    """auth_state carries uidNumber and homeDirectory; the job runs as that account, in that home."""
    spool = Path(tempfile.mkdtemp(prefix="hpchub-test-ldap-spool-"))
    spool.chmod(0o755)
    hub = None
    try:
        hub = ldap_hub([A], spawner_lines=[
            'c.JupyterHub.spawner_class = "local"',
            f"c.LocalBatchSpawner.local_spool_dir = {str(spool / 'spool')!r}",
        ])
        browser = Browser(hub.url)
        browser.login("alice", PASSWORDS["alice"])
        state = spawn_until_ready(hub, browser, "alice")["state"]
        account = hub.api("GET", "/users/alice").json()["auth_state"]
        [(pid, env)] = [(pid, env) for pid, env in singleuser_processes(account["uidNumber"])
                        if env.get("LOCALQ_JOB_ID") == state["job_id"]]
        assert Path(f"/proc/{pid}").stat().st_gid == account["gidNumber"]
        assert os.readlink(f"/proc/{pid}/cwd") == account["homeDirectory"] == env["HOME"]
        assert state["job_env_file"].startswith(account["homeDirectory"] + "/.hpchub/run/")
        assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    finally:
        if hub is not None:
            hub.stop()      # stops the server (and its local job) while the spool is still there
        subprocess.run(["rm", "-rf", "--", str(spool)], timeout=30)
