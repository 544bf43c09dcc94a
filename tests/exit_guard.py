"""A pytest plugin: once pytest is done, the process exits within EXIT_GRACE_S, stuck or not.

After the summary, the interpreter must exit. Whatever holds it (a non-daemon thread, an atexit
hook joining a dead child, a library's static destructor) would keep `make test` running into
CI's time limit with nothing on record. So EXIT_GRACE_S after pytest is done this prints every
Python thread's stack and the live child processes, and exits with pytest's own status.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from pathlib import Path

import pytest

# 120 s: a clean exit of this suite takes under 5 s (atexit hooks, numba/ffcv finalizers,
# measured with `time make test` minus pytest's own duration), so 120 s means stuck.
# ZOO_TEST_EXIT_GRACE_S overrides it (tests/test_exit_guard.py uses 2 s).
EXIT_GRACE_S = float(os.environ.get("ZOO_TEST_EXIT_GRACE_S", 120))
_status = {"code": 1}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status["code"] = int(exitstatus)


def live_children(pid: int | None = None) -> list[str]:
    """``"<pid> <command line>"`` of each live child of ``pid`` (this process), read from /proc."""
    me, out = str(pid or os.getpid()), []
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{child} {cmd[:200]}")
        except (OSError, IndexError):
            continue
    return out


def _exit_stuck() -> None:
    err = sys.__stderr__
    err.write(f"\npytest finished {EXIT_GRACE_S:g} s ago but its process has not exited; its threads:\n")
    err.flush()
    faulthandler.dump_traceback(err, all_threads=True)
    err.write("live child processes:\n" + ("\n".join(live_children()) or "none") + "\n")
    err.write(f"exiting with pytest's status {_status['code']}\n")
    err.flush()
    os._exit(_status["code"])


def pytest_unconfigure(config: pytest.Config) -> None:
    timer = threading.Timer(EXIT_GRACE_S, _exit_stuck)
    timer.daemon = True  # never holds the exit itself
    timer.start()
    # A backstop in C, for a hang where Python threads no longer run (late finalization): exit 1.
    faulthandler.dump_traceback_later(2 * EXIT_GRACE_S, exit=True, file=sys.__stderr__)
