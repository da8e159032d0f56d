"""Job scripts: directives come only from the admin's template, user values only as data."""
from __future__ import annotations

import signal
import subprocess

import pytest
from jinja2.exceptions import SecurityError, UndefinedError

from job_templates import TemplateValueError, dhms, directive, hms, render_env_file, render_job_script
from schedulers.base import InvalidRequest, JobRequest

REQUEST = JobRequest(
    name="jupyterhub-alice", tag="0123abcd", cores=4, memory_mb=2048, gpus=1, walltime_s=5400,
    partition="debug", account="physics", workdir="/home/alice", output="/home/alice/.hpchub/logs/jupyterhub-%j.log",
    env_setup=("module load python/3.11",), extra_directives=("--exclusive",),
)
ENV = {"JUPYTERHUB_API_TOKEN": "s3cret token", "JUPYTERHUB_USER": "alice", "ODD": "it's $(rm -rf ~) `x`"}
COMMAND = ["/opt/hpchub/bin/batchspawner-singleuser", "jupyterhub-singleuser", "--arg=a b"]


def render(template: str, request: JobRequest = REQUEST, **kwargs) -> str:
    return render_job_script(template, request, user="alice", env_file="/home/alice/.hpchub/run/x.env",
                             command=COMMAND, **kwargs)


def test_slurm_directives_are_exactly_the_requested_ones():
    script = render("slurm.sh.j2")
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=jupyterhub-alice", "#SBATCH --comment=0123abcd", "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=2048M", "#SBATCH --gres=gpu:1",
        "#SBATCH --time=0-01:30:00", "#SBATCH --partition=debug", "#SBATCH --account=physics",
        "#SBATCH --chdir=/home/alice", "#SBATCH --output=/home/alice/.hpchub/logs/jupyterhub-%j.log",
        "#SBATCH --exclusive",
    ]
    assert script.startswith("#!/bin/bash\n")


def test_gpu_type_and_parallel_environment():
    """Slurm names the GPU model in the gres; Grid Engine takes the slots from the chosen parallel environment;
    PBS has no standard GPU model resource (sites name their own), so only ngpus."""
    typed = JobRequest(name="n", tag="t", cores=4, nodes=2, gpus=2, gpu_type="a100", parallel_environment="orte")
    directives = {template: [line for line in render(template, typed).splitlines() if line.startswith("#")]
                  for template in ("slurm.sh.j2", "sge.sh.j2", "pbs.sh.j2")}
    assert "#SBATCH --gres=gpu:a100:2" in directives["slurm.sh.j2"]
    assert [d for d in directives["sge.sh.j2"] if d.startswith("#$ -pe")] == ["#$ -pe orte 8"]
    assert "#PBS -l select=2:ncpus=4:ngpus=2" in directives["pbs.sh.j2"]
    assert not any("a100" in d or "orte" in d for d in directives["pbs.sh.j2"])
    one_slot = render("sge.sh.j2", JobRequest(name="n", tag="t", parallel_environment="smp"))
    assert "#$ -pe smp 1\n" in one_slot
    untyped = render("slurm.sh.j2", JobRequest(name="n", tag="t", gpus=1))
    assert "#SBATCH --gres=gpu:1\n" in untyped


@pytest.mark.parametrize("field", ["gpu_type", "parallel_environment"])
def test_gpu_type_and_parallel_environment_are_words(field):
    with pytest.raises(InvalidRequest) as err:
        JobRequest(name="n", tag="t", **{field: "a100\n#SBATCH --qos=high"})
    assert err.value.field == field


def test_local_directives():
    script = render("local.sh.j2")
    assert [line for line in script.splitlines() if line.startswith("#LOCALQ")] == [
        "#LOCALQ --name=jupyterhub-alice", "#LOCALQ --comment=0123abcd", "#LOCALQ --time=5400", "#LOCALQ --chdir=/home/alice",
        "#LOCALQ --output=/home/alice/.hpchub/logs/jupyterhub-%j.log",
    ]


def test_the_script_holds_no_secret_and_sources_the_environment_file(tmp_path):
    """Run the script in bash with a command that prints what it sees."""
    env_path = tmp_path / "job.env"
    env_path.write_text(render_env_file(ENV))
    show = ["bash", "-c", 'printf "%s\\n" "$JUPYTERHUB_API_TOKEN" "$ODD" "$@"', "show", *COMMAND]
    script = render_job_script("slurm.sh.j2", JobRequest(name="n", tag="t"), user="alice", env_file=str(env_path),
                               command=show)
    assert "s3cret" not in script
    out = subprocess.run(["bash", "-c", script.split("\n", 1)[1]], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("hpchub: job started") and lines[-1].startswith("hpchub: job ended")
    assert lines[1:-1] == ["s3cret token", "it's $(rm -rf ~) `x`", *COMMAND]


@pytest.mark.parametrize("signal_name", ["TERM", "USR1"])
def test_the_schedulers_signal_reaches_the_server_as_sigterm_and_its_status_is_the_jobs(tmp_path, signal_name):
    """Slurm's --signal=B:TERM and Grid Engine's SIGUSR1 at s_rt reach the job's shell: the server gets SIGTERM,
    shuts down its way, and its exit status (0) is the job's."""
    env_path = tmp_path / "job.env"
    env_path.write_text(render_env_file(ENV))
    server = ["bash", "-c", 'trap "echo clean shutdown; exit 0" TERM; echo serving; while :; do sleep 0.1; done']
    script = render_job_script("sge.sh.j2", JobRequest(name="n", tag="t"), user="alice", env_file=str(env_path),
                               command=server)
    job = subprocess.Popen(["bash", "-c", script.split("\n", 1)[1]], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().startswith("hpchub: job started")
    assert job.stdout.readline() == "serving\n"
    job.send_signal(getattr(signal, f"SIG{signal_name}"))
    out, _ = job.communicate(timeout=10)
    assert job.returncode == 0
    assert out.splitlines()[0] == "clean shutdown" and "with status 0" in out.splitlines()[-1]


def test_walltime_signal_directives():
    request = JobRequest(name="n", tag="t", walltime_s=3600, signal_before_end_s=300)
    slurm = render_job_script("slurm.sh.j2", request, user="alice", env_file="/e", command=["c"])
    sge = render_job_script("sge.sh.j2", request, user="alice", env_file="/e", command=["c"])
    assert "#SBATCH --time=0-01:00:00" in slurm and "#SBATCH --signal=B:TERM@300" in slurm
    assert "#$ -l h_rt=01:00:00" in sge and "#$ -l s_rt=00:55:00" in sge
    # a lead as long as the walltime would signal at once: no signal
    short = JobRequest(name="n", tag="t", walltime_s=300, signal_before_end_s=300)
    assert "#SBATCH --signal" not in render_job_script("slurm.sh.j2", short, user="alice", env_file="/e", command=["c"])


@pytest.mark.parametrize("field,value", [
    ("partition", "debug\n#SBATCH --qos=high"), ("account", "a b"), ("name", "x'y"), ("workdir", "/tmp/$(id)"),
    ("qos", "`id`"), ("reservation", '"r"'), ("constraint", "a\n#$ -l h=x"), ("output", "/tmp/x\n#PBS -q x"),
    ("tag", "#SBATCH"), ("cores", 0), ("walltime_s", -5), ("extra_directives", ("--a\n--b",)),
    ("env_setup", ("ok", "two\rlines")),
])
def test_unsafe_request_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as err:
        JobRequest(**{**REQUEST.__dict__, field: value})
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize("value", ["a b", "x'y", "$(id)", "`id`", "a\nb", "#x", 'a"b', "a;b"])
def test_the_directive_filter_refuses_what_validation_would(value):
    """A second line of defence for admin templates that place values the request did not validate."""
    with pytest.raises(TemplateValueError):
        directive(value)


def test_bad_env_name_is_refused():
    with pytest.raises(TemplateValueError):
        render_env_file({"A=B": "x"})


def test_admin_template_dir_overrides_and_typos_fail(tmp_path):
    (tmp_path / "site.sh.j2").write_text('{% extends "slurm.sh.j2" %}{% block setup %}module load site{% endblock %}\n')
    assert "module load site" in render("site.sh.j2", template_dirs=[str(tmp_path)])
    (tmp_path / "typo.sh.j2").write_text("#SBATCH --partition={{ request.partiton }}\n")
    with pytest.raises(UndefinedError):
        render("typo.sh.j2", template_dirs=[str(tmp_path)])


def test_templates_are_sandboxed(tmp_path):
    (tmp_path / "evil.sh.j2").write_text("{{ request.__class__.__init__.__globals__ }}\n")
    with pytest.raises(SecurityError):
        render("evil.sh.j2", template_dirs=[str(tmp_path)])


def test_walltime_formats():
    assert hms(5400) == "01:30:00" and hms(100 * 3600) == "100:00:00"
    assert dhms(5400) == "0-01:30:00" and dhms(2 * 86400 + 61) == "2-00:01:01"
