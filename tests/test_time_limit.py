"""tests/time_limit.py: an unmarked test over the time limit fails naming the marker; marked ones pass."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers import run

INNER = '''
import time
import pytest

def test_unmarked_sleeper():
    time.sleep(0.6)

@pytest.mark.slow
def test_marked_sleeper():
    time.sleep(0.6)

@pytest.mark.ddp
def test_ddp_sleeper():
    time.sleep(0.6)

def test_quick():
    pass

@pytest.mark.xfail(strict=True)
def test_slow_xfail():
    time.sleep(0.6)
    assert False
'''


def _pytest(tmp_path: Path, limit: str):
    (tmp_path / "test_inner.py").write_text(INNER)
    return run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p", "tests.time_limit",
                "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_inner.py"],
               cwd=tmp_path, timeout=120, env={"ZOO_TEST_TIME_LIMIT": limit})


def test_an_unmarked_slow_test_fails_and_a_marked_one_passes(tmp_path):
    r = _pytest(tmp_path, "0.3")
    assert r.returncode == 1, r.stdout[-2000:]
    assert "1 failed, 3 passed, 1 xfailed" in r.stdout, r.stdout[-2000:]
    assert "FAILED test_inner.py::test_unmarked_sleeper" in r.stdout
    assert "over the 0.3 s limit for a test without a marker: add @pytest.mark.slow" in r.stdout
    assert "ZOO_TEST_TIME_LIMIT" in r.stdout


def test_limit_zero_turns_it_off(tmp_path):
    r = _pytest(tmp_path, "0")
    assert r.returncode == 0, r.stdout[-2000:]
    assert "4 passed, 1 xfailed" in r.stdout


def test_default_limit_and_bad_value(monkeypatch):
    import pytest

    from tests import time_limit

    monkeypatch.delenv("ZOO_TEST_TIME_LIMIT", raising=False)
    assert time_limit.time_limit() == 10.0
    monkeypatch.setenv("ZOO_TEST_TIME_LIMIT", "ten")
    with pytest.raises(pytest.UsageError, match="ZOO_TEST_TIME_LIMIT='ten' is not a number"):
        time_limit.time_limit()
