"""tests/xdist_units.py: under pytest-xdist, the Slurm tests share one worker, slow and multi-process
tests are units of their own and run first, the rest go by module."""

from __future__ import annotations

import pytest

from tests.helpers import pythonpath

pytest.importorskip("xdist")

INNER = '''
import os
import pytest

def _log(name):
    with open(os.environ["UNITS_LOG"], "a") as f:
        f.write(f"{os.environ['PYTEST_XDIST_WORKER']} {name}\\n")

def test_plain_a():
    _log("plain_a")

@pytest.mark.slurm
def test_slurm_1():
    _log("slurm_1")

def test_plain_b():
    _log("plain_b")

@pytest.mark.slurm
def test_slurm_2():
    _log("slurm_2")

@pytest.mark.slow
def test_slow():
    _log("slow")

@pytest.mark.ddp
def test_ddp():
    _log("ddp")

@pytest.mark.slurm
def test_slurm_3():
    _log("slurm_3")
'''


def test_slurm_tests_share_a_worker_and_heavy_units_start_first(pytester: pytest.Pytester, tmp_path, monkeypatch):
    log = tmp_path / "units.log"
    monkeypatch.setenv("UNITS_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", pythonpath())  # the subprocess imports tests.xdist_units
    pytester.makeini("[pytest]\nmarkers =\n    slurm\n    slow\n    ddp\n")
    pytester.makepyfile(test_inner=INNER)
    r = pytester.runpytest_subprocess("-p", "tests.xdist_units", "-p", "no:cacheprovider", "-n", "2",
                                      "--dist", "loadgroup", "--no-loadscope-reorder")
    r.assert_outcomes(passed=7)
    runs = [line.split() for line in log.read_text().splitlines()]
    worker = {name: w for w, name in runs}
    assert len({worker["slurm_1"], worker["slurm_2"], worker["slurm_3"]}) == 1, runs
    assert worker["plain_a"] == worker["plain_b"], runs  # one module: one unit
    per_worker: dict[str, list[str]] = {}
    for w, name in runs:
        per_worker.setdefault(w, []).append(name)
    for names in per_worker.values():  # on each worker, every heavy test before any plain one
        plain = [n.startswith("plain") for n in names]
        assert plain == sorted(plain), runs
