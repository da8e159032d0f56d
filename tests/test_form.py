"""The spawn form and the validation of user options: the form built from profiles and live partition
limits, the form path and the REST path giving the same choice, every refusal naming its field, and the
preview endpoint on a real hub."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from batchspawner.form import (Choice, FormError, options_from_form, render_form, validate_options,
                               visible_profiles)
from batchspawner.profiles import parse_catalog
from schedulers.base import Associations, PartitionInfo

ROOT = Path(__file__).resolve().parents[1]

# two partitions on a Slurm cluster, two queues on a Grid Engine cluster, three profiles (one for a group)
CONFIG = """
[clusters.hpc]
display_name = "HPC (Slurm)"
scheduler = "slurm"

[clusters.hpc.partitions.debug]
max_walltime = "02:00:00"
max_cores = 4

[clusters.hpc.partitions.long]
max_walltime = "2-00:00:00"
accounts = ["physics", "chemistry"]

[clusters.grid]
display_name = "Grid <Engine>"
scheduler = "sge"

[profiles.small]
display_name = "Small"
description = "1 core <b>and</b> 2 GB"
cluster = "hpc"
partitions = ["debug"]
defaults = { cores = 1, memory = "2G", walltime = "00:30:00" }
bounds = { walltime = { max = "04:00:00" }, memory = { max = "4G" } }
user_editable = ["walltime", "memory"]
modules = ["python/3.11"]

[profiles.standard]
display_name = "Standard"
cluster = "hpc"
partitions = ["debug", "long"]
defaults = { partition = "debug", cores = 2, memory = "4G", walltime = "01:00:00" }
bounds = { cores = { min = 1, max = 6 }, memory = { min = "1G", max = "16G" }, walltime = { max = "08:00:00" } }
user_editable = ["partition", "cores", "memory", "walltime", "account", "qos"]

[profiles.grid]
display_name = "Grid shared memory"
cluster = "grid"
groups = ["Chem-Lab"]
defaults = { partition = "all.q", cores = 2, walltime = "00:05:00", parallel_environment = "smp" }
user_editable = ["partition", "cores", "parallel_environment", "account"]
env_setup = ["export OMP_NUM_THREADS=$NSLOTS"]
"""

LIVE = {
    "hpc": [
        PartitionInfo("debug", default=True, max_walltime_s=3600, max_cores_per_node=8, max_memory_mb_per_node=8000,
                      nodes_total=2, nodes_idle=1),
        PartitionInfo("long", max_walltime_s=7 * 86400, max_cores_per_node=8, max_memory_mb_per_node=64000,
                      nodes_total=2, nodes_idle=2),
    ],
    "grid": [
        PartitionInfo("all.q", default=True, max_cores_per_node=8, parallel_environments=("make", "smp", "mpi"),
                      nodes_total=1, nodes_idle=1),
        PartitionInfo("short.q", max_walltime_s=600, max_cores_per_node=2, parallel_environments=("smp",),
                      nodes_total=1, nodes_idle=0),
    ],
}
ASSOCIATIONS = {"hpc": Associations("alice", accounts=("physics", "biology"), default_account="physics",
                                    qos=("normal", "high"), default_qos="normal")}


@pytest.fixture(scope="module")
def profiles():
    data = tomllib.loads(CONFIG)
    return parse_catalog(data["clusters"], [{"name": k, **v} for k, v in data["profiles"].items()],
                         source="test.toml").profiles


def validate(options, profiles, groups=("chem-lab",)) -> Choice:
    return validate_options(options, profiles=profiles, user_groups=groups, partitions=LIVE,
                            associations=ASSOCIATIONS)


class Page(HTMLParser):
    """Elements of the form by tag, with their attributes, and the text of each option."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.option_text: dict[tuple[str, str], str] = {}
        self._select: str | None = None
        self._option: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "select":
            self._select = attributes["name"]
        if tag == "option":
            self._option = attributes["value"]
            self.option_text[(self._select, self._option)] = ""

    def handle_endtag(self, tag):
        if tag == "option":
            self._option = None

    def handle_data(self, data):
        if self._option is not None:
            self.option_text[(self._select, self._option)] += data

    def find(self, tag: str, **wanted: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in wanted.items())]

    def one(self, tag: str, **wanted: str) -> dict[str, str | None]:
        found = self.find(tag, **wanted)
        assert len(found) == 1, (tag, wanted, found)
        return found[0]

    def options(self, select: str) -> list[str]:
        return [a["value"] for t, a in self.elements if t == "option" and (select, a["value"]) in self.option_text
                and self._belongs(select, a)]

    def _belongs(self, select: str, option: dict) -> bool:
        # options follow their select in document order
        inside = False
        for tag, attributes in self.elements:
            if tag == "select":
                inside = attributes["name"] == select
            elif tag == "option" and attributes is option:
                return inside
        return False


def debug_limits(page: Page) -> dict:
    return json.loads(page.one("option", value="debug")["data-limits"])


# --- the form ---------------------------------------------------------------------------------------

def test_form_from_two_partitions_and_three_profiles(profiles):
    html = render_form(visible_profiles(profiles, ["chem-lab"]), partitions=LIVE, associations=ASSOCIATIONS)
    page = Page(html)
    assert [a["value"] for a in page.find("input", type="radio", name="profile")] == ["small", "standard", "grid"]
    assert "checked" in page.one("input", value="small")
    # only the chosen profile's fields are shown, submitted and checked by the browser
    sections = {a["data-profile-section"]: a for a in page.find("fieldset") if "data-profile-section" in a}
    assert [name for name, a in sections.items() if "disabled" not in a and "hidden" not in a] == ["small"]
    assert all("disabled" in a and "hidden" in a for name, a in sections.items() if name != "small")
    # the standard profile: partition choice with idle nodes, bounds of the pre-selected partition
    assert page.options("standard.partition") == ["debug", "long"]
    assert page.option_text[("standard.partition", "debug")] == "debug: 1 of 2 nodes idle, up to 01:00:00"
    assert page.option_text[("standard.partition", "long")] == "long: 2 of 2 nodes idle, up to 08:00:00"
    cores = page.one("input", name="standard.cores")
    assert (cores["type"], cores["min"], cores["max"], cores["value"]) == ("number", "1", "4", "2")  # admin cap 4
    walltime = page.one("input", name="standard.walltime")
    assert (walltime["data-max"], walltime["value"]) == ("3600", "01:00:00")  # debug's live limit 1 h < 8 h
    # each partition carries its own limits for the form's script
    long = json.loads(page.one("option", value="long")["data-limits"])
    assert long["fields"]["cores"] == {"min": 1, "max": 6, "hint": "at most 6"}           # profile max < 8 cores
    assert long["fields"]["memory"] == {"min": 1024, "max": 16384, "hint": "1G to 16G"}    # the profile's
    assert debug_limits(page)["fields"]["memory"]["max"] == 8000                          # the largest node
    assert long["fields"]["walltime"]["max"] == 8 * 3600                                   # profile max < 7 days
    assert long["allowed"]["account"] == ["physics"]        # admin list for long ∩ the user's associations
    assert debug_limits(page)["allowed"]["account"] == ["physics", "biology"]
    # accounts and QOS from the user's associations
    assert page.options("standard.account") == ["", "physics", "biology"]
    assert page.option_text[("standard.account", "")] == "your default account (physics)"
    assert page.options("standard.qos") == ["", "normal", "high"]
    # the small profile shows only its editable fields; the rest is stated, not editable
    assert [a["name"] for a in page.find("input") if (a["name"] or "").startswith("small.")] == \
        ["small.memory", "small.walltime"]
    assert page.one("input", name="small.walltime")["data-max"] == "3600"
    # Grid Engine in its own terms: queue, slots, parallel environment; no QOS
    assert "<label class=\"form-label\" for=\"hpchub-grid-partition\">Queue</label>" in html
    assert "Slots (cores)" in html and "Parallel environment" in html and "grid.qos" not in html
    assert page.option_text[("grid.partition", "short.q")] == "short.q: 0 of 1 nodes idle, up to 00:10:00"
    assert page.options("grid.parallel_environment") == ["", "make", "smp", "mpi"]
    assert json.loads(page.one("option", value="short.q")["data-limits"])["allowed"]["parallel_environment"] == ["smp"]
    # a free text (pattern-checked) where nothing lists the values: Grid Engine projects
    assert page.one("input", name="grid.account")["pattern"] == r"[A-Za-z0-9][A-Za-z0-9_.+\-]*"
    # the preview, refreshed by the form's script through the hub API
    assert page.one("pre", id="hpchub-preview") is not None
    assert page.one("div", id="hpchub-options")["data-preview-path"] == "api/batchspawner/preview"


def test_the_forms_script_is_valid_javascript(profiles, tmp_path: Path):
    # its behaviour in a browser belongs to the browser tests; here: it parses, and holds no server value
    from conftest import require_service

    require_service("node", shutil.which("node") is not None, "run scripts/setup-test-env.sh (installs Node.js)")
    html = render_form(visible_profiles(profiles, []), partitions=LIVE, associations=ASSOCIATIONS,
                       last={"profile": "standard", "cores": "3"})
    script = html.split("<script>")[1].split("</script>")[0]
    assert "standard" not in script and "debug" not in script
    (tmp_path / "form.js").write_text(script)
    result = subprocess.run(["node", "--check", str(tmp_path / "form.js")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_hidden_profiles_are_not_in_the_form(profiles):
    html = render_form(visible_profiles(profiles, ["physics"]), partitions=LIVE, associations=ASSOCIATIONS)
    assert [a["value"] for a in Page(html).find("input", type="radio")] == ["small", "standard"]
    assert "grid" not in html.lower()


def test_the_last_choices_are_pre_filled(profiles):
    last = {"profile": "standard", "partition": "long", "cores": 5, "memory": "12G", "walltime": "06:00:00",
            "account": "physics"}
    page = Page(render_form(visible_profiles(profiles, []), partitions=LIVE, associations=ASSOCIATIONS, last=last))
    assert "checked" in page.one("input", value="standard") and "checked" not in page.one("input", value="small")
    assert "selected" in page.one("option", value="long")
    assert page.one("input", name="standard.cores")["value"] == "5"
    assert page.one("input", name="standard.cores")["max"] == "6"             # long's limits, as it is chosen
    assert page.one("input", name="standard.memory")["value"] == "12G"
    assert page.one("input", name="standard.walltime")["value"] == "06:00:00"
    account = [a for a in page.find("option", value="physics") if page._belongs("standard.account", a)]
    assert "selected" in account[0]


def test_values_are_escaped_data(profiles):
    last = {"profile": "small", "memory": '"><script>alert(1)</script>'}
    html = render_form(visible_profiles(profiles, ["chem-lab"]), partitions=LIVE, associations=ASSOCIATIONS,
                       last=last, server_name='x"><img>')
    assert "<script>alert" not in html and "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>and</b>" not in html and "1 core &lt;b&gt;and&lt;/b&gt; 2 GB" in html
    assert "Grid &lt;Engine&gt;" in html and 'data-server-name="x&#34;&gt;&lt;img&gt;"' in html


def test_without_live_limits_the_admin_limits_apply(profiles):
    page = Page(render_form(visible_profiles(profiles, []), partitions={}, associations={}))
    assert page.one("input", name="standard.cores")["max"] == "4"             # the admin's cap on debug
    assert page.one("input", name="standard.walltime")["data-max"] == "7200"
    assert page.option_text[("standard.partition", "long")] == "long"
    # no associations known: the admin's list where there is one (long), anything on debug
    assert page.options("standard.account") == ["", "physics", "chemistry"]
    assert json.loads(page.one("option", value="debug")["data-limits"])["allowed"]["account"] is None
    assert page.one("input", name="standard.qos")["type"] == "text"
    choice = validate_options({"profile": "standard", "walltime": "02:00:00"}, profiles=profiles, user_groups=[],
                              partitions={}, associations={})
    assert choice.request["walltime_s"] == 7200 and choice.request["partition"] == "debug"


# --- validation ---------------------------------------------------------------------------------------

def test_the_form_and_the_rest_api_give_the_same_choice(profiles):
    posted = {"profile": ["standard"], "standard.partition": ["long"], "standard.cores": ["4"],
              "standard.memory": ["8G"], "standard.walltime": ["04:00:00"], "standard.account": ["physics"],
              "standard.qos": [""], "small.memory": ["2G"], "small.walltime": ["00:30:00"], "_xsrf": ["token"]}
    from_form = validate(options_from_form(posted), profiles)
    from_rest = validate({"profile": "standard", "partition": "long", "cores": 4, "memory": "8192M",
                          "walltime": 240, "account": "physics"}, profiles)
    assert from_form == from_rest
    assert from_form.request == {
        "partition": "long", "cores": 4, "memory_mb": 8192, "gpus": 0, "gpu_type": None, "nodes": 1,
        "walltime_s": 4 * 3600, "account": "physics", "qos": None, "parallel_environment": None,
        "reservation": None, "constraint": None, "env_setup": (), "extra_directives": (),
    }
    assert from_form.options == {"profile": "standard", "partition": "long", "cores": "4", "memory": "8G",
                                 "walltime": "04:00:00", "account": "physics"}
    request = from_form.job_request(name="jupyterhub-alice", tag="abc", workdir="/home/alice",
                                    output="/home/alice/.hpchub/logs/jupyterhub-%j.log")
    assert (request.partition, request.cores, request.walltime_s) == ("long", 4, 14400)


def test_defaults_and_admin_values(profiles):
    choice = validate({}, profiles)                                 # no profile: the first the user may use
    assert choice.profile.name == "small" and choice.cluster.name == "hpc"
    assert choice.request["env_setup"] == ("module load python/3.11",)
    assert (choice.request["partition"], choice.request["memory_mb"], choice.request["walltime_s"]) == \
        ("debug", 2048, 1800)
    grid = validate({"profile": "grid", "partition": "short.q", "cores": "2", "parallel_environment": "smp"},
                    profiles, groups=["CHEM-LAB"])                  # groups compare without case
    assert grid.cluster.scheduler == "sge" and grid.request["parallel_environment"] == "smp"
    assert grid.request["env_setup"] == ("export OMP_NUM_THREADS=$NSLOTS",) and grid.request["qos"] is None


def refused(options, profiles, groups=("chem-lab",)) -> FormError:
    with pytest.raises(FormError) as err:
        validate(options, profiles, groups)
    return err.value


@pytest.mark.parametrize("options,field,message", [
    # out of bounds: the partition's live limit, the profile's bound, the admin's cap
    ({"profile": "standard", "walltime": "03:00:00"}, "walltime",
     "03:00:00 is more than 01:00:00, the time limit of partition 'debug'"),
    ({"profile": "standard", "partition": "long", "walltime": "1-00:00:00"}, "walltime",
     "1-00:00:00 is more than 08:00:00, the most profile 'Standard' allows"),
    ({"profile": "standard", "cores": 5}, "cores", "5 is more than 4, the administrators' limit in partition 'debug'"),
    ({"profile": "standard", "memory": "512M"}, "memory", "512M is less than 1G, the least profile 'Standard' allows"),
    ({"profile": "grid", "partition": "short.q", "cores": 3}, "cores",
     "3 is more than 2, the cores of the largest node in queue 'short.q'"),
    # unknown and administrators' fields
    ({"profile": "small", "colour": "blue"}, "colour",
     "unknown field (user options: profile, partition, cores, memory, gpus, gpu_type, nodes, walltime, account, "
     "qos, parallel_environment)"),
    ({"profile": "small", "env_setup": ["curl evil | sh"]}, "env_setup",
     "set by the administrators only (user options: profile, partition, cores, memory, gpus, gpu_type, nodes, "
     "walltime, account, qos, parallel_environment)"),
    ({"profile": "standard", "partition": "debug", "parallel_environment": "smp"}, "parallel_environment",
     "Slurm jobs on HPC (Slurm) have no parallel environment (fields: partition, cores, memory, gpus, gpu_type, "
     "nodes, walltime, account, qos)"),
    # wrong types
    ({"profile": "standard", "cores": True}, "cores", "expected a whole number or text, got true/false"),
    ({"profile": "standard", "cores": 2.5}, "cores", "expected a whole number or text, got a decimal number"),
    ({"profile": "standard", "account": 7}, "account", "expected text, got a number"),
    ({"profile": "standard", "memory": ["4G", "8G"]}, "memory", "expected a whole number or text, got a list"),
    ({"profile": "standard", "walltime": "soon"}, "walltime",
     "'soon': not a walltime (examples: 90 (minutes), 01:30:00, 2-00:00:00, 1-12) (allowed: a run time such as "
     "01:30:00, 2-00:00:00 or 90 (minutes))"),
    ({"profile": ["small"]}, "profile", "expected text, got a list"),
    # line breaks and control characters
    ({"profile": "standard", "account": "physics\n#SBATCH --uid=0"}, "account",
     "contains a line break or control character"),
    ({"profile": "standard", "walltime": "01:00:00\r"}, "walltime", "contains a line break or control character"),
    ({"profile": "small\u2028"}, "profile", "contains a line break or control character"),
    # a field the profile fixes
    ({"profile": "small", "cores": 2}, "cores", "profile 'Small' does not let you change it (it is 1)"),
    ({"profile": "small", "partition": "long"}, "partition",
     "profile 'Small' does not let you change it (it is debug)"),
    # names the partition or the user's associations do not allow
    ({"profile": "standard", "partition": "gpu"}, "partition",
     "'gpu' is not a partition of profile 'Standard' (allowed: debug, long)"),
    ({"profile": "standard", "partition": "long", "account": "biology"}, "account",
     "'biology' is not available to you in partition 'long' (allowed: physics)"),
    ({"profile": "standard", "qos": "urgent"}, "qos", "'urgent' is not available to you in partition 'debug' "
     "(allowed: normal, high)"),
    ({"profile": "grid", "partition": "short.q", "parallel_environment": "mpi"}, "parallel_environment",
     "'mpi' is not available to you in queue 'short.q' (allowed: smp)"),
    ({"profile": "standard", "account": "phys ics"}, "account",
     "'phys ics': not a valid name (allowed: letters, digits and _.+- , starting with a letter or digit)"),
])
def test_refusals_name_the_field(profiles, options, field, message):
    err = refused(options, profiles)
    assert (err.field, err.message) == (field, message)
    assert str(err) == f"{field}: {message}"


def test_a_forbidden_profile_is_refused_like_an_unknown_one(profiles):
    hidden = refused({"profile": "grid"}, profiles, groups=["physics"])
    unknown = refused({"profile": "nosuch"}, profiles, groups=["physics"])
    assert hidden.field == unknown.field == "profile"
    assert hidden.message == "'grid' is not a profile you can use (yours: small, standard)"
    assert unknown.message == "'nosuch' is not a profile you can use (yours: small, standard)"
    assert refused({}, profiles[2:], groups=[]).message == \
        "no profile is available to you: ask your administrators for access"


def test_a_fixed_value_equal_to_the_default_is_accepted(profiles):
    # a client may echo the defaults back: only a different value is a change
    choice = validate({"profile": "small", "cores": "1", "partition": "debug", "memory": "2048M"}, profiles)
    assert (choice.request["cores"], choice.request["memory_mb"]) == (1, 2048)


def test_a_default_beyond_a_live_limit_says_what_to_do(profiles):
    live = {**LIVE, "grid": [PartitionInfo("all.q", default=True, max_walltime_s=60, parallel_environments=("smp",))]}
    with pytest.raises(FormError) as err:
        validate_options({"profile": "grid"}, profiles=profiles, user_groups=["chem-lab"], partitions=live,
                         associations={})
    assert (err.value.field, err.value.message) == ("walltime", "00:05:00 is more than 00:01:00, the time limit of "
                                                    "queue 'all.q'; profile 'Grid shared memory' does not let you "
                                                    "change it: choose another profile or queue")


def test_the_schedulers_own_checks_come_last(profiles):
    # a drained queue takes no new job: only the scheduler's view (schedulers.limits.check_request) says so
    live = {**LIVE, "grid": [LIVE["grid"][0], PartitionInfo("short.q", state="drain", parallel_environments=("smp",))]}
    with pytest.raises(FormError) as err:
        validate_options({"profile": "grid", "partition": "short.q"}, profiles=profiles, user_groups=["chem-lab"],
                         partitions=live, associations={})
    assert (err.value.field, err.value.message) == (
        "partition", "'short.q' is not allowed (partition short.q is drain: a job submitted now cannot start)")


GPU_CONFIG = {
    "clusters": {"hpc": {"scheduler": "slurm", "partitions": {"gpu": {"gpu_types": ["a100", "v100", "h100"]},
                                                               "cpu": {}}}},
    "profiles": [{"name": "gpu", "partitions": ["gpu", "cpu"], "defaults": {"partition": "gpu", "gpus": 1},
                  "user_editable": ["partition", "gpus", "gpu_type"]}],
}
GPU_LIVE = {"hpc": [PartitionInfo("gpu", gpus={"a100": 4, "v100": 2, "": 4}, nodes_total=2),
                    PartitionInfo("cpu", default=True, gpus={}, nodes_total=4)]}


def test_gpus_and_their_types_per_partition():
    profiles = parse_catalog(GPU_CONFIG["clusters"], GPU_CONFIG["profiles"], source="test").profiles
    page = Page(render_form(profiles, partitions=GPU_LIVE, associations={}))
    assert page.one("input", name="gpu.gpus")["max"] == "4"
    assert page.options("gpu.gpu_type") == ["", "a100", "v100"]       # h100: allowed, but the partition has none
    assert json.loads(page.one("option", value="cpu")["data-limits"])["fields"]["gpus"]["max"] == 0

    def check(**options):
        return validate_options({"profile": "gpu", **options}, profiles=profiles, user_groups=[], partitions=GPU_LIVE,
                                associations={})

    assert check(gpus="2", gpu_type="v100").request["gpu_type"] == "v100"
    for options, field, message in [
        ({"gpus": 3, "gpu_type": "v100"}, "gpus", "3 is more than 2, the GPUs of the largest node in partition 'gpu'"),
        ({"gpus": 5}, "gpus", "5 is more than 4, the GPUs of the largest node in partition 'gpu'"),
        ({"gpu_type": "h100"}, "gpu_type", "'h100' is not available to you in partition 'gpu' (allowed: a100, v100)"),
        ({"partition": "cpu", "gpu_type": "a100", "gpus": 0}, "gpu_type",
         "'a100' is not available to you in partition 'cpu' (allowed: none)"),
        ({"partition": "cpu"}, "gpus", "1 is more than 0, the GPUs of the largest node in partition 'cpu'"),
    ]:
        with pytest.raises(FormError) as err:
            check(**options)
        assert (err.value.field, err.value.message) == (field, message)
    assert check(partition="cpu", gpus=0).request["gpus"] == 0


def test_a_partition_gone_from_the_scheduler_is_refused(profiles):
    live = {**LIVE, "hpc": [PartitionInfo("long", default=True)]}
    with pytest.raises(FormError) as err:
        validate_options({"profile": "standard", "partition": "debug"}, profiles=profiles, user_groups=[],
                         partitions=live, associations={})
    assert (err.value.field, err.value.message) == ("partition", "HPC (Slurm) has no partition 'debug' now "
                                                                 "(available: long)")


def test_options_from_form_keeps_the_chosen_profile_only():
    posted = {"profile": ["b"], "a.cores": ["9"], "b.cores": ["2"], "b.walltime": ["01:00:00"], "_xsrf": ["t"],
              "stray": ["x"], "b.memory": ["1G", "2G"]}
    assert options_from_form(posted) == {"profile": "b", "cores": "2", "walltime": "01:00:00", "stray": "x",
                                         "memory": ["1G", "2G"]}


def test_the_documented_example_is_valid():
    docs = (ROOT / "docs" / "config.md").read_text()
    section = docs.split("## Example: a Slurm cluster and a Grid Engine cluster")[1]
    example = section.split("```toml\n")[1].split("```")[0]
    data = tomllib.loads(example)
    catalog = parse_catalog(data["clusters"], [{"name": k, **v} for k, v in data["profiles"].items()],
                            source="docs/config.md")
    assert [p.name for p in catalog.profiles] == ["small", "gpu", "grid-smp"]
    assert catalog.profiles[1].command_prefix == ("apptainer", "exec", "--nv", "--bind", "/opt/hpchub",
                                                  "/shared/images/pytorch.sif")
    assert catalog.clusters["hpc"].gateway == ("hub.example.org", 2222)


# --- the preview endpoint on a real hub ----------------------------------------------------------------

PREVIEW_SPAWNER = '''
from batchspawner import LocalBatchSpawner
from batchspawner.form import options_from_form, render_form, validate_options, visible_profiles
from batchspawner.profiles import parse_catalog
from job_templates import render_job_script
from schedulers.base import PartitionInfo

CATALOG = parse_catalog(
    {"hpc": {"scheduler": "slurm", "partitions": {"debug": {"max_walltime": "02:00:00"}, "long": {}}}},
    [{"name": "small", "partitions": ["debug", "long"], "defaults": {"walltime": "00:30:00"},
      "user_editable": ["partition", "walltime", "cores"]},
     {"name": "staff", "groups": ["staff"]}],
    source="test")
LIVE = {"hpc": [PartitionInfo("debug", default=True, max_walltime_s=3600, nodes_total=2, nodes_idle=2),
                PartitionInfo("long", max_walltime_s=86400, nodes_total=2, nodes_idle=1)]}


class PreviewSpawner(LocalBatchSpawner):
    """Stands in for the spawner's own preview_script: validate, build the request, render."""

    def groups(self):
        return [g.name for g in self.user.groups]

    async def preview_script(self, options):
        choice = validate_options(options, profiles=CATALOG.profiles, user_groups=self.groups(), partitions=LIVE,
                                  associations={})
        request = choice.job_request(name="jupyterhub-" + self.user.name, tag="preview", workdir="/home/x",
                                     output="/home/x/.hpchub/logs/jupyterhub-%j.log")
        return render_job_script("slurm.sh.j2", request, user=self.user.name, env_file="/home/x/.hpchub/run/x.env",
                                 command=["batchspawner-singleuser", "jupyterhub-singleuser"])


def form(spawner):
    return render_form(visible_profiles(CATALOG.profiles, spawner.groups()), partitions=LIVE, associations={},
                       last=spawner.user_options, user_name=spawner.user.name, server_name=spawner.name)


c.JupyterHub.spawner_class = PreviewSpawner
c.PreviewSpawner.options_form = form
c.PreviewSpawner.options_from_form = options_from_form
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = "hpchub-test-password"
c.Authenticator.allowed_users = {"alice", "bob"}
c.JupyterHub.allow_named_servers = True
'''


@pytest.fixture
def preview_hub(tmp_path: Path, proxy_installed):
    from hubtools import start_hub

    # the hub runs this checkout's code, as the tests do
    hub = start_hub(tmp_path / "hub", PREVIEW_SPAWNER, env={"PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)})
    yield hub
    hub.stop()


def test_the_preview_endpoint_on_a_real_hub(preview_hub):
    import requests
    from hubtools import Browser

    browser = Browser(preview_hub.url)
    browser.login("alice", "hpchub-test-password")
    page = browser.get("/hub/spawn")
    assert page.status_code == 200
    form = Page(page.text)
    assert [a["value"] for a in form.find("input", type="radio", name="profile")] == ["small"]   # staff: hidden
    assert form.option_text[("small.partition", "debug")] == "debug: 2 of 2 nodes idle, up to 01:00:00"

    answer = browser.api("POST", "/batchspawner/preview", json={"profile": "small", "walltime": "00:45:00"})
    assert answer.status_code == 200, answer.text
    script = answer.json()["script"]
    assert "#SBATCH --time=0-00:45:00\n" in script and "#SBATCH --partition=debug\n" in script

    refused = browser.api("POST", "/batchspawner/preview", json={"profile": "small", "walltime": "02:00:00"})
    assert refused.status_code == 400
    assert refused.json() == {"status": 400, "field": "walltime", "message": "walltime: 02:00:00 is more than "
                              "01:00:00, the time limit of partition 'debug'"}
    forbidden = browser.api("POST", "/batchspawner/preview", json={"profile": "staff"})
    assert forbidden.status_code == 400 and forbidden.json()["field"] == "profile"
    assert browser.api("POST", "/batchspawner/preview", json=["small"]).status_code == 400
    assert browser.api("POST", "/batchspawner/preview?server_name=nosuch", json={}).status_code == 404
    assert browser.api("POST", "/batchspawner/preview?user=alice", json={}).status_code == 200
    assert browser.api("POST", "/batchspawner/preview?user=bob", json={}).status_code == 404   # not hers
    assert Page(page.text).one("div", id="hpchub-options")["data-user-name"] == "alice"
    # a service with the servers scope (the tests' admin service) names the user
    assert preview_hub.api("POST", "/batchspawner/preview?user=alice", json={}).status_code == 200
    assert preview_hub.api("POST", "/batchspawner/preview", json={}).status_code == 400

    # a cookie without the XSRF token, or no credentials at all, gets nothing
    no_xsrf = browser.session.post(f"{preview_hub.url}/hub/api/batchspawner/preview", json={}, timeout=30)
    assert no_xsrf.status_code == 403
    anonymous = requests.post(f"{preview_hub.url}/hub/api/batchspawner/preview", json={}, timeout=30)
    assert anonymous.status_code == 403
