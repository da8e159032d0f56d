"""The long fuzzing run of issue 10: the suite's properties (tests/test_fuzz.py) over 10,000 cases each.

    /opt/hpchub/bin/python bench/fuzz.py [--examples 10000]

Runs the validation and rendering properties on the form/REST user options (arbitrary option objects, and
one field at a time on each profile) and the walltime bound; prints how many cases were accepted and refused
and how long it took. Any failure prints Hypothesis's smallest failing example and exits 1. (The HTTP and
LDAP properties need the test services: run them with pytest.)
"""
from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
# the tests' helpers, in place of this directory (whose tunnel.py would shadow the tunnel package)
sys.path[0] = str(TESTS)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_fuzz  # noqa: E402
from batchspawner.form import FormError, validate_options  # noqa: E402
from batchspawner.profiles import parse_catalog  # noqa: E402
from test_form import ASSOCIATIONS, CONFIG, LIVE  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    examples = parser.parse_args().examples
    data = tomllib.loads(CONFIG)
    profiles = parse_catalog(data["clusters"], [{"name": k, **v} for k, v in data["profiles"].items()],
                             source="tests/test_form.py").profiles
    counts = {"accepted": 0, "refused": 0}

    def counted(options) -> None:
        test_fuzz.check(options, profiles)
        try:
            validate_options(options, profiles=profiles, user_groups=("chem-lab",), partitions=LIVE,
                             associations=ASSOCIATIONS)
            counts["accepted"] += 1
        except FormError:
            counts["refused"] += 1

    many = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

    @many
    @given(options=test_fuzz.OPTIONS)
    def arbitrary(options):
        counted(options)

    @many
    @given(profile=st.sampled_from(["small", "standard", "grid"]), field=st.sampled_from(test_fuzz.FIELDS[1:]),
           value=test_fuzz.VALUES)
    def one_field(profile, field, value):
        counted({"profile": profile, field: value})

    status = 0
    for name, run in (("arbitrary user_options", arbitrary), ("one field at a time", one_field)):
        counts.update(accepted=0, refused=0)
        started = time.perf_counter()
        try:
            run()
            verdict = "held"
        except Exception as err:  # noqa: BLE001 - Hypothesis re-raises the property's failure
            verdict, status = f"FAILED: {err!r}"[:500], 1
        took = time.perf_counter() - started
        total = counts["accepted"] + counts["refused"]
        print(f"{name:24s} {total:6d} cases ({counts['accepted']} accepted, {counts['refused']} refused) "
              f"in {took:6.1f} s ({total / took:7.0f}/s): property {verdict}")
    return status


if __name__ == "__main__":
    sys.exit(main())
