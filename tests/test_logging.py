"""The library's messages are log records of its packages' loggers (``zoo``, ``datamodules``,
``callbacks``): shown at INFO on stderr by default, as before, from rank zero only, and silenced or
redirected with the standard logging configuration."""

from __future__ import annotations

import logging
import sys

import pytest

from tests.helpers import run

SCRIPT = """
import logging, sys
import torch
import zoo

path = sys.argv[1]
torch.save(zoo.create_network("convnet", num_classes=3).state_dict(), path)
zoo.load("convnet", weights=path)                       # says "loaded weights from ..."
logging.getLogger("zoo").setLevel(logging.WARNING)      # the user silences the zoo's info lines
zoo.load("convnet", weights=path)
"""


@pytest.mark.slow  # a fresh Python that imports torch and the zoo: 9-11 s on 2 cores
def test_info_lines_show_on_stderr_and_the_zoo_logger_silences_them(tmp_path):
    r = run([sys.executable, "-c", SCRIPT, tmp_path / "w.pt"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [line for line in r.stderr.splitlines() if "loaded weights from" in line]
    assert len(said) == 1 and said[0].startswith("loaded weights from "), r.stderr[-2000:]  # the plain line, once
    assert "loaded weights" not in r.stdout


def test_records_carry_the_module_logger_and_only_rank_zero_logs(tmp_path, caplog, monkeypatch):
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    import zoo
    from datamodules.cpus import loader_workers, usable_cpus

    path = tmp_path / "w.pt"
    torch.save(zoo.create_network("convnet", num_classes=3).state_dict(), path)
    caplog.set_level(logging.INFO)
    zoo.load("convnet", weights=path)
    loader_workers(usable_cpus() + 1)
    names = {r.name for r in caplog.records if "loaded weights from" in r.getMessage() or "lowered to" in r.getMessage()}
    assert names == {"zoo.base", "datamodules.cpus"}, names

    caplog.clear()
    top = logging.getLogger("datamodules")
    level = top.level
    top.setLevel(logging.WARNING)
    try:
        loader_workers(usable_cpus() + 1)
    finally:
        top.setLevel(level)
    assert not [r for r in caplog.records if "lowered to" in r.getMessage()]

    caplog.clear()
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # another DDP process: no line from it
    zoo.load("convnet", weights=path)
    assert not [r for r in caplog.records if "loaded weights from" in r.getMessage()]
