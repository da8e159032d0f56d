"""hpchub's TOML configuration: `hpchub --check-config` on broken files (run as the real command), the
example that `--generate-config` writes, the traitlets Config a file becomes, and loading it in the hub
together with a jupyterhub_config.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchspawner.profiles import ConfigError, parse_catalog
from hpchub.app import HpcHub
from hpchub.config import SETTINGS, check, load

ROOT = Path(__file__).resolve().parents[1]
HPCHUB = Path(sys.executable).with_name("hpchub")

VALID = """
[hub]
bind_url = "http://127.0.0.1:8123/"
db_url = "sqlite:////var/lib/hpchub/hub.sqlite"
ledger_url = "postgresql+psycopg://hpchub:s3cret@db.example.org/ledger"
authenticator = "ldap"
admin_users = ["alice"]
admin_groups = ["hpc-admins"]
allowed_groups = ["hpc-users"]

[ldap]
server_urls = ["ldap://127.0.0.1:10389"]
bind_dn_templates = ["uid={username},ou=people,dc=hpchub,dc=test"]
receive_timeout = 7

[spawner]
queue_timeout = 600
default_url = "/lab"

[clusters.hpc]
display_name = "HPC (Slurm)"
scheduler = "slurm"

[clusters.hpc.partitions.debug]
max_walltime = "01:00:00"

[clusters.hpc.partitions.long]
max_nodes = 1

[clusters.grid]
scheduler = "sge"

[profiles.small]
cluster = "hpc"
partitions = ["debug"]
defaults = { cores = 1, memory = "2G", walltime = "00:30:00" }
bounds = { walltime = { max = "01:00:00" }, memory = { max = "4G" } }
user_editable = ["walltime", "memory"]

[profiles.grid]
cluster = "grid"
defaults = { cores = 2 }
user_editable = ["cores", "parallel_environment"]
"""


def run_hpchub(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command, with this checkout's code first on the path."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT),
           "HPCHUB_DATA_DIR": str(cwd / "data")}
    return subprocess.run([str(HPCHUB), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "hpchub.toml"
    path.write_text(text)
    return run_hpchub("--check-config", str(path), cwd=tmp_path)


BROKEN = {
    "scheduler-typo": (
        '[clusters.hpc]\nscheduler = "slrum"\n',
        ['clusters.hpc.scheduler = "slrum": not one of the choices; did you mean "slurm"? '
         '(allowed: "slurm", "sge", "pbs", "local")'],
    ),
    "unknown-key": (
        '[clusters.hpc]\nscheduler = "slurm"\n[clusters.hpc.partitions.debug]\nmax_waltime = "01:00:00"\n'
        '[profiles.p]\ncluster = "hpc"\n',
        ['clusters.hpc.partitions.debug.max_waltime: unknown key; did you mean "max_walltime"? (allowed: '
         'max_walltime, max_cores, max_memory, max_gpus, gpu_types, max_nodes, accounts, qos, parallel_environments)'],
    ),
    "unknown-cluster": (
        '[clusters.hpc]\nscheduler = "slurm"\n[profiles.small]\ncluster = "hcp"\n',
        ['profiles.small.cluster = "hcp": no such cluster; did you mean "hpc"? (allowed: "hpc")'],
    ),
    "unknown-partition": (
        '[clusters.hpc]\nscheduler = "slurm"\n[clusters.hpc.partitions.debug]\n'
        '[profiles.small]\ncluster = "hpc"\npartitions = ["debug", "gpu"]\n',
        ['profiles.small.partitions = ["debug", "gpu"]: cluster \'hpc\' offers no partition \'gpu\'; add '
         '[clusters.hpc.partitions.gpu] or remove it here (allowed: "debug")'],
    ),
    "default-outside-bounds": (
        '[clusters.hpc]\nscheduler = "slurm"\n[profiles.small]\n'
        'defaults = { walltime = "10:00:00" }\nbounds = { walltime = { max = "08:00:00" } }\n',
        ['profiles.small.defaults.walltime = "10:00:00": outside the profile\'s bounds (allowed: at most 08:00:00)'],
    ),
    "default-above-partition-cap": (
        '[clusters.hpc]\nscheduler = "slurm"\n[clusters.hpc.partitions.debug]\nmax_cores = 4\n'
        '[profiles.small]\ndefaults = { cores = 8 }\n',
        ["profiles.small.defaults.cores = 8: above the cap of partition 'debug' "
         "(clusters.hpc.partitions.debug.max_cores) (allowed: at most 4)"],
    ),
    "wrong-types": (
        '[hub]\nadmin_users = "alice"\n[spawner]\njob_poll_interval = "30"\n'
        '[clusters.hpc]\nscheduler = "slurm"\n[profiles.small]\ndefaults = { cores = "four", memory = true }\n',
        ['hub.admin_users = "alice": expected a list of names (allowed: ["alice", "bob"])',
         'spawner.job_poll_interval = "30": expected a number (allowed: a number from 1)',
         'profiles.small.defaults.cores = "four": not a whole number (allowed: a whole number)',
         'profiles.small.defaults.memory = true: expected a whole number or text, got true/false (allowed: a size '
         'such as 512M, 4G, 1.5T (a bare number is MB))'],
    ),
    "field-the-scheduler-lacks": (
        '[clusters.grid]\nscheduler = "sge"\n[profiles.p]\nuser_editable = ["cores", "qos"]\n',
        ['profiles.p.user_editable = ["cores", "qos"]: Grid Engine jobs have no qos (allowed: partition, cores, '
         'memory, gpus, nodes, walltime, account, parallel_environment)'],
    ),
    "another-schedulers-key": (
        '[clusters.hpc]\nscheduler = "slurm"\ndefault_queue = "all.q"\n[clusters.grid]\nscheduler = "sge"\n'
        'default_queue = "long.q"\n[clusters.grid.partitions."all.q"]\n[profiles.p]\ncluster = "grid"\n',
        ['clusters.hpc.default_queue = "all.q": only used with scheduler = "sge"',
         'clusters.grid.default_queue = "long.q": not one of the cluster\'s queues (allowed: "all.q")'],
    ),
    "ssh-without-host": (
        '[clusters.hpc]\nscheduler = "slurm"\nrunner = "ssh"\n[profiles.p]\n',
        ['clusters.hpc.ssh: missing: runner = "ssh" needs a [clusters.hpc.ssh] table with host, user, known_hosts '
         'and client_keys'],
    ),
    "tls-files-missing": (
        '[hub]\nssl_cert = "/nonexistent/cert.pem"\nssl_key = "/nonexistent/key.pem"\n',
        ['hub.ssl_cert = "/nonexistent/cert.pem": no such file (allowed: the path of an existing file)',
         'hub.ssl_key = "/nonexistent/key.pem": no such file (allowed: the path of an existing file)'],
    ),
    "groups-without-a-directory": (
        '[hub]\nauthenticator = "demo"\nadmin_groups = ["admins"]\n',
        ['hub.admin_groups = ["admins"]: groups need an authenticator that knows them; hub.authenticator is "demo" '
         '(allowed: "ldap" or "pam")'],
    ),
    "not-toml": (
        '[hub\nbind_url = 1\n',
        ["(file): not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 5)"],
    ),
}


# these go through the real command (each start costs seconds: JupyterHub's imports); the others through
# the function behind it, hpchub.config.check
THROUGH_THE_COMMAND = ("scheduler-typo", "unknown-key", "unknown-cluster", "unknown-partition",
                       "default-outside-bounds", "wrong-types")


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_config_names_file_key_value_and_allowed_values(tmp_path: Path, case: str):
    text, expected = BROKEN[case]
    path = tmp_path / "hpchub.toml"
    if case in THROUGH_THE_COMMAND:
        result = check_config(tmp_path, text)
        status, output = result.returncode, result.stderr
        assert result.stdout == ""
    else:
        path.write_text(text)
        status, output = check(str(path))
    assert status == 1, output
    lines = output.strip().splitlines()
    assert lines[:-1] == [f"{path}: {line}" for line in expected], output
    count = len(expected)
    assert lines[-1] == f"{path}: {count} problem{'s' if count > 1 else ''}; hpchub would not start."


def test_tls_certificate_and_key_must_belong_together(tmp_path: Path):
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", f"/CN={name}", "-keyout", str(tmp_path / f"{name}.key"),
                        "-out", str(tmp_path / f"{name}.crt")],
                       check=True, capture_output=True, timeout=60)
    text = f'[hub]\nbind_url = "https://127.0.0.1:8443/"\nssl_cert = "{tmp_path}/a.crt"\nssl_key = "{tmp_path}/b.key"\n'
    path = tmp_path / "hpchub.toml"
    path.write_text(text)
    status, output = check(str(path))
    assert status == 1
    assert (f"hub.ssl_cert: {tmp_path}/a.crt and {tmp_path}/b.key are not a PEM certificate and its private key: "
            "KEY_VALUES_MISMATCH (allowed: PEM files; the key unencrypted)") in output
    path.write_text(text.replace("b.key", "a.key"))
    assert check(str(path))[0] == 0


def test_a_database_password_is_never_repeated(tmp_path: Path):
    path = tmp_path / "hpchub.toml"
    path.write_text('[hub]\ndb_url = "postgres ql://hub:s3cret-pw@db/hub"\n')
    status, output = check(str(path))
    assert status == 1
    assert f"{path}: hub.db_url: not a database URL" in output
    assert "s3cret-pw" not in output


def test_a_valid_file_gets_a_summary_and_exit_0(tmp_path: Path):
    result = check_config(tmp_path, VALID)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{tmp_path}/hpchub.toml: valid.",
        "  hub: http://127.0.0.1:8123/, authenticator ldap, database sqlite:////var/lib/hpchub/hub.sqlite",
        "  cluster hpc: Slurm, runner auto, tunnel direct, partitions: debug, long",
        "  cluster grid: Grid Engine, runner auto, tunnel direct, partitions: all the scheduler reports",
        "  profile small: on hpc, for everyone; users may change: walltime, memory",
        "  profile grid: on grid, for everyone; users may change: cores, parallel_environment",
    ]


def test_generate_config_writes_an_example_that_passes_the_check(tmp_path: Path):
    written = run_hpchub("--generate-config", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    example = tmp_path / "hpchub.toml"
    assert "[clusters.hpc]" in example.read_text() and "[profiles.small]" in example.read_text()
    checked = run_hpchub("--check-config", str(example), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "cluster grid: Grid Engine" in checked.stdout
    assert "profile staff: on hpc, for groups hpc-admins" in checked.stdout
    again = run_hpchub("--generate-config", cwd=tmp_path)
    assert again.returncode == 1 and "hpchub.toml exists; use -y to overwrite it" in again.stderr
    elsewhere = run_hpchub("--generate-config", "-f", str(tmp_path / "site.toml"), cwd=tmp_path)
    assert elsewhere.returncode == 0 and (tmp_path / "site.toml").read_text() == example.read_text()


def test_the_file_becomes_traitlets_config(tmp_path: Path):
    path = tmp_path / "hpchub.toml"
    path.write_text(VALID)
    config = load(str(path)).config
    assert config.JupyterHub.bind_url == "http://127.0.0.1:8123/"
    assert config.JupyterHub.db_url == "sqlite:////var/lib/hpchub/hub.sqlite"
    assert config.JupyterHub.authenticator_class == "hpchub.ldap.LDAPAuthenticator"
    assert config.JupyterHub.spawner_class == "batchspawner.BatchSpawner"
    assert config.Authenticator.admin_users == {"alice"}
    assert config.LDAPAuthenticator.admin_groups == {"hpc-admins"}
    assert config.LDAPAuthenticator.allowed_groups == {"hpc-users"}
    assert config.LDAPAuthenticator.receive_timeout == 7
    assert config.BatchSpawner.ledger_url == "postgresql+psycopg://hpchub:s3cret@db.example.org/ledger"
    assert config.BatchSpawner.queue_timeout == 600 and config.Spawner.default_url == "/lab"
    # the shapes the spawner parses with batchspawner.profiles.parse_catalog
    assert config.BatchSpawner.clusters == {
        "hpc": {"display_name": "HPC (Slurm)", "scheduler": "slurm",
                "partitions": {"debug": {"max_walltime": "01:00:00"}, "long": {"max_nodes": 1}}},
        "grid": {"scheduler": "sge"},
    }
    assert [p["name"] for p in config.BatchSpawner.profiles] == ["small", "grid"]
    assert config.BatchSpawner.profiles[0]["defaults"] == {"cores": 1, "memory": "2G", "walltime": "00:30:00"}
    catalog = parse_catalog(config.BatchSpawner.clusters, config.BatchSpawner.profiles, source="BatchSpawner")
    assert catalog.profiles[0].bounds["walltime"].max == 3600 and catalog.profiles[1].cluster.scheduler == "sge"
    # what each cluster's adapter is made with, besides its runner and command_timeout
    assert catalog.clusters["hpc"].adapter_kwargs() == {"cluster": None}
    assert catalog.clusters["grid"].adapter_kwargs() == {"default_queue": None, "gpu_complex": "gpu"}


def test_ldap_settings_are_checked_together(tmp_path: Path):
    path = tmp_path / "hpchub.toml"
    path.write_text('[hub]\nauthenticator = "ldap"\n[ldap]\nserver_urls = ["ldaps://ldap.example.org"]\n'
                    'bind_dn_templates = ["uid={username},dc=example,dc=org"]\n')
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert str(err.value) == (f"{path}: ldap: 'ldaps://ldap.example.org' does not fit tls_mode 'starttls': use "
                              'ldap:// URLs or tls_mode "ldaps" (allowed: see docs/ldap.md)')


@pytest.fixture
def hub(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HPCHUB_DATA_DIR", str(tmp_path / "data"))
    HpcHub.clear_instance()
    yield HpcHub.instance()
    HpcHub.clear_instance()


def test_the_hub_loads_the_toml_file_then_the_python_file_beside_it(hub: HpcHub, tmp_path: Path):
    (tmp_path / "hpchub.toml").write_text(VALID)
    (tmp_path / "jupyterhub_config.py").write_text(
        'c.Spawner.default_url = "/tree"\nc.JupyterHub.cleanup_servers = False\n')
    hub.parse_command_line(["-f", str(tmp_path / "hpchub.toml"), "--JupyterHub.bind_url=http://127.0.0.1:9000/"])
    hub.load_config_file(hub.config_file)
    assert hub.config.BatchSpawner.queue_timeout == 600                      # from the TOML file
    assert hub.config.Spawner.default_url == "/tree"                         # the Python file wins over it
    assert hub.cleanup_servers is False
    assert hub.bind_url == "http://127.0.0.1:9000/"                          # and the command line over both
    assert hub.db_url == "sqlite:////var/lib/hpchub/hub.sqlite"
    assert hub.config.BatchSpawner.ledger_url == "postgresql+psycopg://hpchub:s3cret@db.example.org/ledger"


def test_an_explicit_jupyterhub_config_is_loaded_instead(hub: HpcHub, tmp_path: Path):
    (tmp_path / "hpchub.toml").write_text(VALID)
    (tmp_path / "jupyterhub_config.py").write_text('c.Spawner.default_url = "/tree"\n')
    other = tmp_path / "site.py"
    other.write_text('c.Spawner.default_url = "/other"\n')
    hub.parse_command_line(["-f", str(tmp_path / "hpchub.toml"), f"--jupyterhub-config={other}"])
    hub.load_config_file(hub.config_file)
    assert hub.config.Spawner.default_url == "/other"


def test_a_real_hub_runs_from_the_toml_file_and_the_python_file_beside_it(tmp_path: Path, proxy_installed):
    from hubtools import HUB_BIN, Hub, _hub_env, free_port, hub_config

    port, token = free_port(), "t" * 64
    # the Python file (hubtools' test set-up: ports, data dir, an admin service) beside the TOML file
    (tmp_path / "jupyterhub_config.py").write_text(hub_config("", port=port, service_token=token,
                                                              data_dir=tmp_path / "data"))
    (tmp_path / "hpchub.toml").write_text('[hub]\nauthenticator = "pam"\nadmin_users = ["alice"]\n'
                                          'allowed_users = ["bob"]\n')
    env = {**_hub_env(), "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    hub = Hub(f"http://127.0.0.1:{port}", tmp_path, [str(HUB_BIN), "-f", str(tmp_path / "hpchub.toml")], env,
              False, token)
    hub.launch()
    try:
        users = {u["name"]: u["admin"] for u in hub.api("GET", "/users").json()}
        assert users == {"alice": True, "bob": False}
        assert "Loading " + str(tmp_path / "jupyterhub_config.py") in hub.log()
    finally:
        hub.stop()


def test_a_broken_file_stops_the_hub_with_its_problems(tmp_path: Path):
    (tmp_path / "hpchub.toml").write_text('[hub]\nbind_url = "ftp://x"\n')
    result = run_hpchub("-f", str(tmp_path / "hpchub.toml"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'{tmp_path}/hpchub.toml: hub.bind_url = "ftp://x": not an http(s) URL (allowed: "http://host:port/" or '
        '"https://host:port/")',
        f"hpchub did not start: fix the configuration (check it with `hpchub --check-config {tmp_path}/hpchub.toml`).",
    ]


def test_every_key_is_a_documented_traitlet():
    from batchspawner import BatchSpawner
    from hpchub.ldap import LDAPAuthenticator
    from jupyterhub.auth import Authenticator
    from jupyterhub.spawner import Spawner

    classes = {c.__name__: c for c in (HpcHub, BatchSpawner, LDAPAuthenticator, Authenticator, Spawner)}
    classes["JupyterHub"] = HpcHub
    docs = (ROOT / "docs" / "config.md").read_text()
    table = dict(re.findall(r"^\| `([a-z_.]+)` \| `([A-Za-z]+\.[a-z_]+)`", docs, re.MULTILINE))
    assert table == {key: setting.traitlet for key, setting in SETTINGS.items()}
    for key, setting in SETTINGS.items():
        cls, name = setting.traitlet.split(".")
        trait = classes[cls].class_traits(config=True).get(name)
        assert trait is not None and trait.help, f"{key} -> {setting.traitlet}: no configurable traitlet with help"
