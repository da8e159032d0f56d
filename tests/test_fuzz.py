"""Property tests (Hypothesis) of every input a user controls, against the real validation and rendering:
form fields and REST user_options, server names, usernames at login. A few hundred cases here;
`bench/fuzz.py` runs 10,000.

Properties: validation either refuses with a FormError naming a field or gives a request whose rendered
script differs from the profile's default script only in the values of directive lines, each a single
safe word (a user value never reaches the shell or a new line); out-of-bounds values are refused; nothing
raises anything else; over HTTP nothing answers 500."""
from __future__ import annotations

import asyncio
import json
import re

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchspawner.form import FormError, validate_options
from hubtools import Browser
from job_templates import render_job_script
from test_e2e_hub import LOGIN, PASSWORD, hub_factory  # noqa: F401 (fixture)
from test_form import ASSOCIATIONS, LIVE, profiles  # noqa: F401 (fixture)
from test_ldap import PASSWORDS, directory, login, make  # noqa: F401 (fixture)

CASES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = ["profile", "partition", "cores", "memory", "walltime", "gpus", "gpu_type", "nodes", "account", "qos",
          "parallel_environment", "env_setup", "extra_directives", "reservation"]
NASTY = ["", " ", "\n", "debug\n#SBATCH --qos=high", "$(id)", "`id`", "'", '"', ";", "&&", "|", "#", "\\", "\x00",
         "\r", "\t", "ü", "🙂", "--exclusive", "-1", "0", "1e9", "9" * 40, "01:00:00", "4G", "debug", "long",
         "physics", "smp", "all.q", "normal", "high", "small", "standard", "grid", "00:10:00\n", "{{ 7*7 }}",
         "{% raw %}", "%j", "../../etc/passwd", "*",
         "¹", "٣", "٣G", "１２:00:00"]   # digits of other scripts: str.isdigit() and \\d take some, int() others
VALUES = st.one_of(st.sampled_from(NASTY), st.text(max_size=30), st.integers(min_value=-10, max_value=10 ** 7),
                   st.booleans(), st.none(), st.floats(allow_nan=True), st.lists(st.text(max_size=5), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
OPTIONS = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), VALUES, max_size=8)
DIRECTIVE = re.compile(r"#(SBATCH|\$) .*")
# directive values come from validated words: no quote, dollar, backtick, semicolon or space
SAFE_DIRECTIVE = re.compile(r"#SBATCH --[a-z-]+(=[A-Za-z0-9_.:+/%@,=~-]+)?|#\$ -[a-zA-Z_]+( [A-Za-z0-9_.:+/%@,=~$-]+)*")
TEMPLATES = {"slurm": "slurm.sh.j2", "sge": "sge.sh.j2"}


def script_for(choice) -> str:
    request = choice.job_request(name="jupyterhub-alice", tag="fuzz", workdir="/home/alice",
                                 output="/home/alice/.hpchub/logs/jupyterhub-%j.log")
    return render_job_script(TEMPLATES[choice.cluster.scheduler], request, user="alice",
                             env_file="/home/alice/.hpchub/run/fuzz.env",
                             command=[*choice.command_prefix, "/opt/hpchub/bin/batchspawner-singleuser",
                                      "jupyterhub-singleuser"])


def split(script: str) -> tuple[list[str], list[str]]:
    lines = script.splitlines()
    return [line for line in lines if DIRECTIVE.fullmatch(line)], [line for line in lines if not DIRECTIVE.fullmatch(line)]


def check(options, profiles) -> None:  # noqa: F811
    try:
        choice = validate_options(options, profiles=profiles, user_groups=("chem-lab",), partitions=LIVE,
                                  associations=ASSOCIATIONS)
    except FormError as err:
        assert isinstance(err.field, str) and err.field and str(err).startswith(f"{err.field}: ")
        if isinstance(options, dict):
            named = set(options) | {repr(key)[:64] for key in options}
            assert err.field in named or err.field in FIELDS, (err.field, options)
        return
    directives, rest = split(script_for(choice))
    baseline = validate_options({"profile": choice.profile.name}, profiles=profiles, user_groups=("chem-lab",),
                                partitions=LIVE, associations=ASSOCIATIONS)
    assert rest == split(script_for(baseline))[1], "a user value changed the script outside its directives"
    assert all(SAFE_DIRECTIVE.fullmatch(line) for line in directives), directives
    bounds = choice.profile.bounds.get("walltime")
    if bounds is not None and bounds.max is not None and choice.request["walltime_s"] is not None:
        assert choice.request["walltime_s"] <= bounds.max


@CASES
@given(options=OPTIONS)
def test_arbitrary_user_options(profiles, options):  # noqa: F811
    check(options, profiles)


@CASES
@given(profile=st.sampled_from(["small", "standard", "grid"]), field=st.sampled_from(FIELDS[1:]), value=VALUES)
@example(profile="small", field="cores", value="¹")          # found by bench/fuzz.py: a crash, now a refusal
@example(profile="small", field="memory", value="٣G")
def test_one_field_at_a_time_on_each_profile(profiles, profile, field, value):  # noqa: F811
    check({"profile": profile, field: value}, profiles)


@CASES
@given(hours=st.integers(min_value=5, max_value=10 ** 4))
def test_walltime_beyond_the_bounds_is_refused(profiles, hours):  # noqa: F811
    with pytest.raises(FormError) as err:
        validate_options({"profile": "small", "walltime": f"{hours}:00:00"}, profiles=profiles, user_groups=(),
                         partitions=LIVE, associations=ASSOCIATIONS)
    assert err.value.field == "walltime"


def test_over_http_nothing_answers_500(hub_factory, slurm_cluster, test_users):
    """The same inputs through a real hub: the preview endpoint (the spawn's validation and rendering, nothing
    submitted), named server names, and usernames at the login form."""
    from test_e2e_profiles import CATALOG

    hub = hub_factory(LOGIN + CATALOG)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    xsrf = {"X-XSRFToken": browser.xsrf("/hub/")}
    seen: dict[int, int] = {}

    @settings(max_examples=60, deadline=None)
    @given(options=OPTIONS)
    def preview(options):
        # serialized here: requests refuses NaN and infinities, which a client may still send (as bare words)
        response = browser.session.post(f"{hub.url}/hub/api/batchspawner/preview", data=json.dumps(options),
                                        headers={**xsrf, "Content-Type": "application/json"}, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400), (options, response.status_code, response.text[:300])

    @settings(max_examples=40, deadline=None)
    @given(name=st.one_of(st.sampled_from(NASTY), st.text(max_size=40)))
    def server_name(name):
        response = browser.session.get(f"{hub.url}/hub/api/users/alice/servers/{requests.utils.quote(name, safe='')}",
                                       headers=xsrf, timeout=30)
        assert response.status_code < 500, (name, response.status_code)

    @settings(max_examples=40, deadline=None)
    @given(username=st.one_of(st.sampled_from(NASTY), st.text(max_size=40)))
    def login_name(username):
        page = requests.Session()
        form = page.get(f"{hub.url}/hub/login", timeout=10)
        token = re.search(r'name="_xsrf" value="([^"]+)"', form.text).group(1)
        response = page.post(f"{hub.url}/hub/login", data={"username": username, "password": "x", "_xsrf": token},
                             allow_redirects=False, timeout=10)
        assert response.status_code < 500 and response.status_code != 302, (username, response.status_code)

    preview()
    server_name()
    login_name()
    assert seen.get(400), seen
    assert "Uncaught exception" not in hub.log()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(username=st.one_of(st.sampled_from(NASTY + ["*)(uid=*", "admin)(|(uid=*", "alice)(&"]), st.text(max_size=40)))
def test_ldap_usernames_never_log_in_nor_raise(directory, username):  # noqa: F811
    """Against the real directory: an arbitrary username with alice's password never logs in (unless it is
    alice) and never raises."""
    result = asyncio.run(login(make(), username, PASSWORDS["alice"]))
    assert result is None or result["name"] == "alice", (username, result)
