"""The demo cluster of docker/slurm-cluster/compose.yaml, checked without a Docker engine: the compose file
and the Dockerfile parse and name only files that exist; the containers run the native test cluster's own
configuration (slurm.conf.in, docker/ldap's scripts and LDIF), of which the repository holds no second
copy; the demo hub's TOML passes `hpchub --check-config` and agrees with the compose file; the login node
shares no network with the compute nodes. Building and running the images needs Docker, which these tests
do not use."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import require_service

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "docker" / "slurm-cluster"
COMPOSE = DEMO / "compose.yaml"
DOCKERFILE = DEMO / "Dockerfile"
CONTAINER_SH = DEMO / "container.sh"
TEMPLATE = DEMO / "slurm.conf.in"
ACCOUNTING = DEMO / "accounting.conf"
DEMO_TOML = DEMO / "hpchub-demo.toml"
LDAP_DIR = REPO / "docker" / "ldap"
LDAP_SH = LDAP_DIR / "ldap.sh"
LDAP_CONTAINER_SH = LDAP_DIR / "container.sh"
HPCHUB = Path(sys.executable).with_name("hpchub")

DOCKERFILE_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                           "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# the compose specification's service keys (those a misspelling would most likely hit, and more)
SERVICE_KEYS = {"build", "image", "hostname", "command", "entrypoint", "environment", "env_file", "volumes",
                "networks", "network_mode", "depends_on", "healthcheck", "init", "restart", "ports", "expose",
                "cap_add", "cap_drop", "container_name", "working_dir", "user", "stop_grace_period",
                "stop_signal", "labels", "tmpfs", "secrets", "configs", "profiles", "ulimits", "shm_size",
                "extra_hosts", "dns", "privileged", "read_only", "devices", "sysctls", "pull_policy"}
TOP_KEYS = {"name", "services", "networks", "volumes", "secrets", "configs", "include"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def shell_value(path: Path, name: str) -> str:
    """NAME=VALUE at the start of a line of a shell script (a plain word, or ${VAR:-DEFAULT}'s default)."""
    match = re.search(rf"^{name}=(\S+)", path.read_text(), re.M)
    assert match, f"{path} sets no {name}"
    value = match.group(1)
    default = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return default.group(1) if default else value.strip("'\"")


def shell_array(path: Path, name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", path.read_text(), re.M)
    assert match, f"{path} sets no array {name}"
    return shlex.split(match.group(1))


# --- the Dockerfile -------------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Logical lines (continuations joined, comments dropped as Docker drops them), each a known
    instruction, grouped into stages."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, where Docker drops comment lines too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, f"{path}: the last instruction (line {start}) ends in a line continuation"
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        assert keyword.upper() in DOCKERFILE_INSTRUCTIONS, f"{path}:{number}: unknown instruction {keyword!r}"
        assert keyword == keyword.upper(), f"{path}:{number}: write instructions in capitals ({keyword})"
        assert "<<" not in args or keyword != "RUN" or "<<<" in args, \
            f"{path}:{number}: heredocs are not checked by this parser"
        if keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"{path}:{number}: FROM IMAGE AS NAME expected"
            stages.append(Stage(base=words[0], name=words[2]))
            continue
        assert stages, f"{path}:{number}: {keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def dockerignore(context: Path, dockerfile: Path) -> list[str]:
    """The patterns of DOCKERFILE.dockerignore beside the Dockerfile (BuildKit), else CONTEXT/.dockerignore."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if candidate.exists():
            return [line.strip() for line in candidate.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    return []


def ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            return True
    return False


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    args = instruction.args
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    words = [w for w in words if not w.startswith("--")]
    assert len(words) >= 2, f"line {instruction.line}: {instruction.keyword} needs a source and a destination"
    return words[:-1], words[-1]


@dataclass
class Image:
    """A build target: its stages from the first, the context, and what the Dockerfile copies into it."""
    context: Path
    dockerfile: Path
    stages: list[Stage]

    def instructions(self, keyword: str) -> list[Instruction]:
        return [i for s in self.stages for i in s.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> list[str]:
        found = self.instructions(keyword)
        assert found, f"{self.stages[-1].name}: no {keyword}"
        return json.loads(found[-1].args)

    def repo_path(self, container_path: str) -> Path | None:
        """The file of the repository that a path in the image comes from (the last COPY wins)."""
        patterns = dockerignore(self.context, self.dockerfile)
        for copy in reversed(self.instructions("COPY")):
            sources, dest = copy_sources(copy)
            for source in sources:
                if container_path == dest or container_path.startswith(dest.rstrip("/") + "/"):
                    relative = container_path[len(dest):].lstrip("/")
                    candidate = (self.context / source / relative).resolve()
                    inside = candidate.relative_to(self.context).as_posix()
                    if candidate.exists() and not ignored(inside, patterns):
                        return candidate
        return None


def image_of(service: dict) -> Image:
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
    stages = parse_dockerfile(dockerfile)
    by_name = {s.name: s for s in stages}
    assert build["target"] in by_name, f"no stage {build['target']} in {dockerfile}"
    chain = [by_name[build["target"]]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return Image(context, dockerfile, chain)


def built_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if "build" in s}


# --- the compose file -----------------------------------------------------------------------------------

def test_compose_file_parses_with_known_keys_and_references():
    data = compose()
    unknown = {k for k in data if k not in TOP_KEYS and not k.startswith("x-")}   # x-: extensions (anchors)
    assert not unknown, f"unknown top-level keys: {unknown}"
    declared_networks, declared_volumes = set(data["networks"]), set(data["volumes"])
    used_networks, used_volumes = set(), set()
    for name, service in data["services"].items():
        unknown = set(service) - SERVICE_KEYS
        assert not unknown, f"service {name}: unknown keys {unknown}"
        assert "image" in service or "build" in service, f"service {name}: neither image nor build"
        for dependency in service.get("depends_on", {}):
            assert dependency in data["services"], f"service {name} depends on unknown {dependency}"
        assert ("networks" in service) != ("network_mode" in service), f"service {name}: networks or network_mode"
        used_networks |= set(service.get("networks", []))
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):   # a bind mount: it must exist in the repository
                assert (COMPOSE.parent / source).exists(), f"service {name}: bind source {source} is missing"
            else:
                used_volumes.add(source)
        test = service.get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD", f"service {name}: healthcheck as an exec list"
    assert used_networks == declared_networks, (used_networks, declared_networks)
    assert used_volumes == declared_volumes, (used_volumes, declared_volumes)


def test_build_contexts_dockerfiles_and_targets_exist():
    built = built_services()
    assert {s["build"]["target"] for s in built.values()} == {"slurm", "login", "ldap"}
    for name, service in built.items():
        image = image_of(service)
        assert image.context == REPO, f"service {name}: the build context must be the repository's root"
        assert image.dockerfile == DOCKERFILE
        # one image name per target: services built from the same target share the image
        assert service["image"] == f"hpchub-demo/{service['build']['target']}:local", name


def test_dockerfile_parses_and_copies_only_what_exists():
    stages = parse_dockerfile(DOCKERFILE)
    assert [s.name for s in stages] == ["base", "ldap", "slurm", "login"]
    names = set()
    patterns = dockerignore(REPO, DOCKERFILE)
    for stage in stages:
        assert stage.base in names or ":" in stage.base, f"stage {stage.name}: FROM a pinned image or a stage"
        names.add(stage.name)
        for instruction in stage.instructions:
            if instruction.keyword in ("COPY", "ADD"):
                sources, dest = copy_sources(instruction)
                assert dest.startswith("/"), f"line {instruction.line}: absolute destinations only"
                for source in sources:
                    path = (REPO / source).resolve()
                    assert path.exists(), f"line {instruction.line}: {source} does not exist"
                    if source != ".":
                        assert not ignored(path.relative_to(REPO).as_posix(), patterns), \
                            f"line {instruction.line}: {source} is left out by the .dockerignore"
            if instruction.keyword in ("ENTRYPOINT", "CMD"):
                assert isinstance(json.loads(instruction.args), list), f"line {instruction.line}: exec form"


def test_every_container_runs_a_script_of_this_repository():
    """Entrypoints and healthchecks name scripts the image holds, from this checkout; roles exist."""
    roles = set(re.search(r"^  (keys\|[^)]*)\)", CONTAINER_SH.read_text(), re.M).group(1).split("|"))
    for name, service in built_services().items():
        image = image_of(service)
        entrypoint = image.last("ENTRYPOINT")
        script = image.repo_path(entrypoint[0])
        assert script is not None and os.access(script, os.X_OK), f"service {name}: {entrypoint[0]} is not in the image"
        command = service.get("command") or image.last("CMD")
        if script == CONTAINER_SH:
            assert command[0] in roles, f"service {name}: container.sh has no role {command[0]}"
        else:
            assert script == LDAP_CONTAINER_SH and command == ["serve"], name
        test = service.get("healthcheck", {}).get("test")
        if test:
            assert image.repo_path(test[1]) is not None, f"service {name}: healthcheck {test[1]} is not in the image"
    for script in (CONTAINER_SH, LDAP_CONTAINER_SH, LDAP_SH, DEMO / "cluster.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{script}: {result.stderr}"


# --- one source of truth ----------------------------------------------------------------------------------

def test_the_containers_use_the_native_configuration_files():
    slurm_image = image_of(services()["slurmctld"])
    ldap_image = image_of(services()["ldap"])
    # the Slurm containers render the template cluster.sh renders, from the same directory
    assert shell_value(CONTAINER_SH, "TEMPLATE") == "$HERE/slurm.conf.in"
    assert shell_value(DEMO / "cluster.sh", "TEMPLATE") == "$HERE/slurm.conf.in"
    here = slurm_image.last("ENTRYPOINT")[0].rsplit("/", 1)[0]
    assert slurm_image.repo_path(f"{here}/slurm.conf.in") == TEMPLATE
    assert slurm_image.repo_path(f"{here}/accounting.conf") == ACCOUNTING
    assert slurm_image.repo_path("/src/docker/lib/service.sh") == REPO / "docker" / "lib" / "service.sh"
    # the directory container runs ldap.sh itself, which loads its LDIF from beside it
    ldap_here = ldap_image.last("ENTRYPOINT")[0].rsplit("/", 1)[0]
    assert shell_value(LDAP_CONTAINER_SH, "LDAP_SH") == "$HERE/ldap.sh"
    for name in ("ldap.sh", "seed.ldif.in", "slapd.ldif.in"):
        assert ldap_image.repo_path(f"{ldap_here}/{name}") == LDAP_DIR / name
    assert '"$HERE/seed.ldif.in"' in LDAP_SH.read_text() and '"$HERE/slapd.ldif.in"' in LDAP_SH.read_text()


def test_no_second_slurm_conf_or_ldif_in_the_repository():
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, timeout=30,
                           check=True).stdout.split("\0")
    slurm_confs, ldifs, fragments = [], [], []
    for name in filter(None, files):
        path = REPO / name
        if not path.is_file() or path.suffix in (".py", ".md"):
            continue  # code and docs may quote configuration; they are not read as configuration
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if re.search(r"^(ClusterName|SlurmctldHost|NodeName|PartitionName)=", text, re.M):
            slurm_confs.append(name)
        elif re.search(r"^Accounting\w+=", text, re.M):
            fragments.append(name)
        if re.search(r"^dn: ", text, re.M) or name.endswith((".ldif", ".ldif.in")):
            ldifs.append(name)
    assert slurm_confs == ["docker/slurm-cluster/slurm.conf.in"]
    assert fragments == ["docker/slurm-cluster/accounting.conf"]
    assert sorted(ldifs) == ["docker/ldap/seed.ldif.in", "docker/ldap/slapd.ldif.in"]


def conf_keys(text: str) -> set[str]:
    return {m.group(1).lower() for m in re.finditer(r"^(\w+)=", text, re.M)} - {"nodename", "partitionname"}


def test_container_slurm_conf_is_the_template_rendered_plus_accounting():
    result = subprocess.run(["bash", str(CONTAINER_SH), "print-conf"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    nodes = "c[1-2]"
    expected = (TEMPLATE.read_text().replace("@CLUSTER_HOST@", "slurmctld").replace("@CONTROLLER_ADDR@", "slurmctld")
                .replace("@NETNS_NODE_ADDR@", "127.0.0.1").replace("@NODE_HOSTNAMES@", nodes)
                .replace("@NODE_ADDRS@", nodes)
                .replace("@ACCOUNTING_STORAGE_TYPE@", "accounting_storage/slurmdbd") + ACCOUNTING.read_text())
    assert result.stdout == expected
    assert not re.search(r"@[A-Za-z_]+@", result.stdout)
    # appended keys must not repeat the template's: slurmctld logs every repeated key as an error
    assert conf_keys(ACCOUNTING.read_text()) & conf_keys(TEMPLATE.read_text()) == set()
    assert re.search(r"^AccountingStorageHost=slurmdbd$", result.stdout, re.M)
    assert services()["slurmdbd"]["hostname"] == "slurmdbd" == shell_value(CONTAINER_SH, "DBD_HOST")
    assert services()["slurmctld"]["hostname"] == "slurmctld" == shell_value(CONTAINER_SH, "CONTROLLER")
    # every compute node of the template is a service of that host name running its slurmd
    for node in ("c1", "c2"):
        assert services()[node]["hostname"] == node and services()[node]["command"] == ["slurmd", node]


def test_slurm_parses_the_container_slurm_conf(tmp_path: Path):
    require_service("Slurm's clients", shutil.which("scontrol") is not None,
                    "run `docker/slurm-cluster/cluster.sh start` as root (installs slurm-client)")
    conf = tmp_path / "slurm.conf"
    conf.write_text(subprocess.run(["bash", str(CONTAINER_SH), "print-conf"], capture_output=True, text=True,
                                   timeout=60, check=True).stdout)
    # reads and parses the whole file (unknown keys and bad values are fatal) and contacts nothing
    result = subprocess.run(["scontrol", "show", "hostnames", "c[1-2]"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SLURM_CONF": str(conf)})
    assert result.returncode == 0 and result.stdout.split() == ["c1", "c2"], result.stderr


def test_demo_users_have_the_directorys_numbers():
    """Alice and bob get their numbers from passwd in the ldap image (ldap.sh reads them); carol and dave
    are fixed in ldap.sh: the Dockerfile's accounts must agree, in every image (the base stage)."""
    base = parse_dockerfile(DOCKERFILE)[0]
    users = dict(re.findall(r"(\w+):(\d+)", next(i.args for i in base.instructions if "useradd" in i.args)))
    assert set(users) == {"alice", "bob", "carol", "dave"}
    ldap = LDAP_SH.read_text()
    for name in ("carol", "dave"):
        upper = name.upper()
        assert re.search(rf"\b{upper}_UID={users[name]}\b", ldap) and re.search(rf"\b{upper}_GID={users[name]}\b", ldap)
        assert re.search(rf"\b{upper}_HOME=/home/{name}\b", ldap)
    assert len(set(users.values())) == 4


def test_images_install_what_the_native_scripts_install():
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE)}

    def installed(stage: str) -> set[str]:
        words = set()
        for i in stages[stage].instructions:
            for command in re.findall(r"apt-get install ([^;&]*)", i.args):
                words |= {w for w in command.split() if not w.startswith("-")}
        return words

    assert set(shell_array(DEMO / "cluster.sh", "PACKAGES")) | {"slurmdbd"} <= installed("slurm")
    ldap_packages = re.search(r"^  apt_install (.*)$", LDAP_SH.read_text(), re.M).group(1).split()
    assert set(ldap_packages) <= installed("ldap")
    preseed = re.search(r"debconf-set-selections <<EOF\n(.*?)\nEOF", LDAP_SH.read_text(), re.S).group(1)
    ldap_run = " ".join(i.args for i in stages["ldap"].instructions)
    for line in preseed.splitlines():
        assert f"'{line}'" in ldap_run, f"the ldap image does not preseed {line!r} as ldap.sh does"
    chp = shell_value(REPO / "scripts" / "setup-test-env.sh", "CHP_SPEC_NODE18")
    assert any(chp in i.args for i in stages["login"].instructions), f"the login image does not install {chp}"
    assert any("scripts/constraints.txt" in i.args for i in stages["slurm"].instructions)


# --- the hub's configuration and the compose file agree ---------------------------------------------------

def demo_settings() -> dict:
    return tomllib.loads(DEMO_TOML.read_text())


def file_paths(value, key: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of the settings that name files or directories (URLs and URL paths aside)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in file_paths(v, f"{key}.{k}".lstrip("."))]
    if isinstance(value, list):
        return [p for v in value for p in file_paths(v, key)]
    is_path = isinstance(value, str) and value.startswith("/") and not key.endswith("url")
    return [(key, value)] if is_path else []


def login_mounts() -> dict[str, str]:
    """Mount point in the login container -> volume."""
    return {v.split(":")[1]: v.split(":")[0] for v in services()["login"]["volumes"]}


def test_demo_toml_passes_check_config(tmp_path: Path):
    """The file as the login node has it: its container paths are volumes of the login node, replaced
    here by local files (the LDAP CA: a real PEM certificate)."""
    mounts = login_mounts()
    text = DEMO_TOML.read_text()
    paths = file_paths(demo_settings())
    assert {key for key, _ in paths} == {"hub.data_dir", "ldap.ca_file"}
    for key, path in paths:
        assert any(path == m or path.startswith(m + "/") for m in mounts), \
            f"{key} = {path}: not on a volume of the login node ({sorted(mounts)})"
        if key == "ldap.ca_file":
            local = tmp_path / "ca.crt"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=demo CA", "-keyout", str(tmp_path / "ca.key"), "-out", str(local)],
                           check=True, capture_output=True, timeout=60)
            text = text.replace(f'"{path}"', f'"{local}"')
    checked = tmp_path / "hpchub-demo.toml"
    checked.write_text(text)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO),
           "HPCHUB_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([str(HPCHUB), "--check-config", str(checked)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{checked}: valid." in result.stdout
    assert "cluster demo: Slurm, runner sudo, tunnel reverse, partitions: debug, long" in result.stdout


def test_demo_toml_agrees_with_the_containers():
    settings = demo_settings()
    svc = services()
    mounts = login_mounts()
    # the hub's data and the LDAP CA: where container.sh expects them, on the login node's volumes
    assert settings["hub"]["data_dir"] == shell_value(CONTAINER_SH, "HUB_DATA")
    assert mounts[settings["hub"]["data_dir"]] == "hub-data"
    ca = settings["ldap"]["ca_file"]
    assert ca == shell_value(CONTAINER_SH, "LDAP_CA") and mounts[ca.rsplit("/", 1)[0]] == "ldap-ca"
    ldap_mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["ldap"]["volumes"]}
    assert ldap_mounts[shell_value(LDAP_CONTAINER_SH, "PUBLISH")] == "ldap-ca"
    assert shell_value(LDAP_CONTAINER_SH, "CA") == shell_value(LDAP_SH, "TLS").replace("$ETC", shell_value(
        LDAP_SH, "ETC")) + "/ca.crt"
    # the directory: both instances, on the host name the ldap container serves
    ports = re.search(r"LDAP_PORT=\(\[a\]=(\d+) \[b\]=(\d+)\)", LDAP_SH.read_text()).groups()
    host = svc["ldap"]["environment"]["HPCHUB_LDAP_HOST"]
    assert host == svc["ldap"]["hostname"]
    assert settings["ldap"]["server_urls"] == [f"ldap://{host}:{port}" for port in ports]
    suffix = shell_value(LDAP_SH, "SUFFIX")
    assert settings["ldap"]["bind_dn_templates"] == [f"uid={{username}},ou=people,{suffix}"]
    assert settings["ldap"]["group_search_base"] == f"ou=groups,{suffix}"
    groups = set(re.findall(r"^cn: (\S+)$", (LDAP_DIR / "seed.ldif.in").read_text(), re.M))
    used = set(settings["hub"]["allowed_groups"]) | set(settings["hub"]["admin_groups"])
    used |= {g for p in settings["profiles"].values() for g in p.get("groups", [])}
    assert used <= groups, f"groups the directory does not have: {used - groups}"
    # the tunnel: jobs dial the egress relay, which forwards that port to the login node's gateway
    host, port = settings["clusters"]["demo"]["tunnel"]["gateway"].rsplit(":", 1)
    assert svc[host]["command"] == ["egress", port, f"login:{port}"] and svc["login"]["hostname"] == "login"
    # the accounts the partitions take exist in slurmdbd
    accounts = set(shell_array(CONTAINER_SH, "ACCOUNTS"))
    for partition in settings["clusters"]["demo"]["partitions"].values():
        assert set(partition["accounts"]) <= accounts
    # MariaDB, slurmdbd and container.sh agree on the database and its password files
    env = svc["mariadb"]["environment"]
    secrets = shell_value(CONTAINER_SH, "SECRETS")
    assert env["MARIADB_DATABASE"] == shell_value(CONTAINER_SH, "DB_NAME")
    assert env["MARIADB_USER"] == shell_value(CONTAINER_SH, "DB_USER")
    assert env["MARIADB_PASSWORD_FILE"] == f"{secrets}/db-password"
    assert env["MARIADB_ROOT_PASSWORD_FILE"] == f"{secrets}/db-root-password"
    assert svc["mariadb"]["hostname"] == shell_value(CONTAINER_SH, "DB_HOST")
    for name in ("keys", "mariadb", "slurmdbd"):
        assert any(v.startswith(f"secrets:{secrets}") for v in svc[name]["volumes"]), name
    assert [n for n, s in svc.items() if any(v.startswith("secrets:") for v in s.get("volumes", []))] == \
        ["keys", "mariadb", "slurmdbd"]


# --- the network design -----------------------------------------------------------------------------------

def test_the_login_node_cannot_reach_the_compute_nodes():
    data = compose()
    svc = data["services"]
    login = set(svc["login"]["networks"])
    for node in ("c1", "c2"):
        nodes = set(svc[node]["networks"])
        assert login & nodes == set(), f"the login node shares {login & nodes} with {node}"
        assert all(data["networks"][n].get("internal") for n in nodes), f"{node} is on a network with a way out"
    # the services on both sides: the controller (Slurm needs it) and the relay, which forwards one port
    # to the login node and nothing back
    bridges = {n for n, s in svc.items() if set(s.get("networks", [])) & login and
               set(s.get("networks", [])) & set(svc["c1"]["networks"])}
    assert bridges == {"slurmctld", "egress"}
    assert svc["egress"]["command"][0] == "egress" and svc["egress"]["command"][2].startswith("login:")
    # only the hub is published, on the Docker host's loopback
    published = {n: s["ports"] for n, s in svc.items() if "ports" in s}
    assert published == {"login": ["127.0.0.1:8000:8000"]}
    assert demo_settings()["hub"]["bind_url"] == "http://0.0.0.0:8000/"


@pytest.mark.parametrize("script", [CONTAINER_SH, LDAP_CONTAINER_SH])
def test_entrypoints_refuse_unknown_roles(script: Path):
    result = subprocess.run(["bash", str(script), "no-such-role"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr
