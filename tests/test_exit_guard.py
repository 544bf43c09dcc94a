"""tests/exit_guard.py: a pytest run whose process cannot exit ends anyway, with its status and the evidence."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUCK = '''
import threading

def hold_the_exit_forever():
    threading.Event().wait()

def test_passes_but_leaves_a_non_daemon_thread():
    threading.Thread(target=hold_the_exit_forever).start()  # non-daemon: the interpreter waits for it
    assert {outcome}
'''


def _run(tmp_path: Path, outcome: str, stuck: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    body = STUCK.format(outcome=outcome)
    if not stuck:
        body = body.replace(".start()", ".start() if False else None")
    (tmp_path / "test_inner.py").write_text(body)
    env = {**os.environ, "ZOO_TEST_EXIT_GRACE_S": "2", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.exit_guard",
                           str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=90)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("outcome,status", [("True", 0), ("False", 1)])
def test_a_stuck_exit_ends_with_pytests_status_and_the_stuck_stack(tmp_path, outcome, status):
    proc, took = _run(tmp_path, outcome)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "has not exited" in proc.stderr
    assert "hold_the_exit_forever" in proc.stderr  # the stack of the thread that held the exit
    assert took < 60


def test_a_clean_exit_is_left_alone(tmp_path):
    proc, _ = _run(tmp_path, "True", stuck=False)
    assert proc.returncode == 0
    assert "has not exited" not in proc.stderr
