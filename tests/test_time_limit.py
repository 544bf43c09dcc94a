"""tests/time_limit.py: an unmarked test over the time limit fails naming the marker; marked ones pass."""

from __future__ import annotations

import pytest

from tests import time_limit

INNER = '''
import time
import pytest

def test_unmarked_sleeper():
    time.sleep(0.3)

@pytest.mark.slow
def test_marked_sleeper():
    time.sleep(0.3)

@pytest.mark.ddp
def test_ddp_sleeper():
    time.sleep(0.3)

def test_quick():
    pass

@pytest.mark.xfail(strict=True)
def test_slow_xfail():
    time.sleep(0.3)
    assert False
'''


def _pytest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, limit: str) -> pytest.RunResult:
    monkeypatch.setenv("ZOO_TEST_TIME_LIMIT", limit)
    pytester.makepyfile(test_inner=INNER)
    return pytester.runpytest("-p", "tests.time_limit", "-p", "no:cacheprovider",
                              "-W", "ignore::pytest.PytestUnknownMarkWarning")


def test_an_unmarked_slow_test_fails_and_a_marked_one_passes(pytester, monkeypatch):
    r = _pytest(pytester, monkeypatch, "0.1")
    r.assert_outcomes(failed=1, passed=3, xfailed=1)
    out = r.stdout.str()
    assert "test_inner.py::test_unmarked_sleeper took 0.3 s, over the 0.1 s limit for a test without a marker: " \
           "add @pytest.mark.slow" in out, out
    assert "ZOO_TEST_TIME_LIMIT=<seconds> raises the limit (0 turns it off)" in out


def test_limit_zero_turns_it_off(pytester, monkeypatch):
    _pytest(pytester, monkeypatch, "0").assert_outcomes(passed=4, xfailed=1)


def test_default_limit_and_a_bad_value(monkeypatch):
    monkeypatch.delenv("ZOO_TEST_TIME_LIMIT", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert time_limit.time_limit() == time_limit.DEFAULT_LIMIT_S == 10.0
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")  # two workers share the CPUs: 10 s alone
    assert time_limit.time_limit() == 20.0
    monkeypatch.setenv("ZOO_TEST_TIME_LIMIT", "30")  # a value given is the limit, workers or not
    assert time_limit.time_limit() == 30.0
    monkeypatch.setenv("ZOO_TEST_TIME_LIMIT", "ten")
    with pytest.raises(pytest.UsageError, match="ZOO_TEST_TIME_LIMIT='ten' is not a number"):
        time_limit.time_limit()
