"""A pytest plugin: a test not marked slow, ddp, slurm or gpu fails when its call takes > 10 s alone.

`make test-fast` runs the unmarked tests (`-m "not slow and not ddp and not slurm"`) and must stay
a few-minute check as the suite grows; a test that outgrows the fast tier fails here, with the
marker to add, instead of slowing every run of that tier. Only the call phase counts (fixtures
such as a session's shared fit are set up once for many tests).

Under N pytest-xdist workers the default limit is N x 10 s (the workers share the CPUs).
ZOO_TEST_TIME_LIMIT (seconds; 0 = off) overrides the limit, as it is: a shared CI machine under load
runs every test slower than the idle 2-core machine the limit was chosen on.
"""

from __future__ import annotations

import os

import pytest

# The project's rule for unmarked tests (< 10 s each on a 2-core CPU machine): at that bound the
# ~450 unmarked tests, most of them well under a second, keep `make test-fast` within minutes.
DEFAULT_LIMIT_S = 10.0
MARKERS = ("slow", "ddp", "slurm", "gpu")


def workers_sharing_the_cpus() -> int:
    """How many pytest-xdist workers run tests at once (1 without xdist)."""
    try:
        return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        return 1


def time_limit() -> float:
    """The limit in seconds from ZOO_TEST_TIME_LIMIT (0 or less: no limit), else DEFAULT_LIMIT_S
    times the number of xdist workers: the rule is 10 s for a test alone, and N workers on the
    machine's cores give each test about 1/N of the CPU its torch threads would use alone (on
    2 cores and 2 workers, tests of 5-6 s alone took 11-13 s)."""
    raw = os.environ.get("ZOO_TEST_TIME_LIMIT", "").strip()
    if not raw:
        return DEFAULT_LIMIT_S * workers_sharing_the_cpus()
    try:
        return float(raw)
    except ValueError:
        raise pytest.UsageError(f"ZOO_TEST_TIME_LIMIT={raw!r} is not a number of seconds (0 turns the limit off)")


_LIMIT = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LIMIT] = time_limit()  # read once: a test's own monkeypatch.setenv cannot change it


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.passed or hasattr(report, "wasxfail"):
        return
    limit = item.config.stash.get(_LIMIT, DEFAULT_LIMIT_S)
    if limit <= 0 or report.duration <= limit or any(item.get_closest_marker(m) for m in MARKERS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} took {report.duration:.1f} s, over the {limit:g} s limit for a test without a marker: "
        f"add @pytest.mark.slow (ddp for several processes, slurm, gpu) or make it faster; on a loaded machine "
        f"ZOO_TEST_TIME_LIMIT=<seconds> raises the limit (0 turns it off)"
    )
