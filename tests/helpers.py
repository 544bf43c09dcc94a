"""What many test modules share: the checkout's paths, the tiny-run CLI arguments, one runner for
`zoo` and python subprocesses. Data fixtures (tiny ImageNet folders) are in tests/conftest.py."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "launch" / "recipes" / "demo.yaml")
ZOO = str(Path(sys.executable).with_name("zoo"))  # the venv's console script

# Small, fast overrides that keep everything else a recipe says.
CPU_TINY = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.strategy", "auto", "--trainer.num_nodes", "1",
]


def tiny_data(root: Path, backend: str = "torchvision", res: int = 32, batch: int = 4) -> list[str]:
    """`--data.*` arguments for a tiny folder: small batches and resolution, no worker processes
    for torchvision (FFCV needs one)."""
    return [
        "--data.root", str(root), "--data.backend", backend, "--data.batch_size", str(batch),
        "--data.num_workers", "0" if backend == "torchvision" else "1",
        "--data.train_res", str(res), "--data.val_res", str(res),
    ]


def pythonpath() -> str:
    """PYTHONPATH with this checkout first, for a subprocess that must import its modules."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def subprocess_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A test subprocess's environment: the test's own, ``WANDB_SILENT=true``, this checkout first on
    PYTHONPATH, then ``env`` over all of it."""
    return {**os.environ, "PYTHONPATH": pythonpath(), "WANDB_SILENT": "true", **(env or {})}


def run(
    argv: Sequence[str | Path],
    cwd: Path | str = REPO,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a `zoo` or python subprocess on this checkout's code and capture its text output.

    The environment is the test's own plus ``WANDB_SILENT=true``, with the checkout first on
    PYTHONPATH (so a worktree's `zoo` runs the worktree's modules); ``env`` overrides any of it,
    PYTHONPATH included.
    """
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=subprocess_env(env), capture_output=True, text=True,
                          timeout=timeout)


def run_zoo(
    args: Sequence[str | Path],
    cwd: Path | str = REPO,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """`zoo ARGS` through the console script (see `run`).

    Unless ``fresh``, ZOO_TEST_FORKSERVER=0 or ``env`` sets a variable read at interpreter start
    (`FRESH_ENV`), the process is forked from tests/zoo_forkserver.py's pre-imported parent instead
    of starting an interpreter: the same argv, environment, directory, pipes and return code,
    without the 7-11 s of imports. Keep ``fresh=True`` for what tests the console script itself.
    """
    argv = [ZOO, *map(str, args)]
    full = subprocess_env(env)
    if fresh or not forkserver_enabled() or any(k in (env or {}) for k in FRESH_ENV) or (
        full["PYTHONPATH"] != _FORKSERVER_PYTHONPATH
    ):
        return run(argv, cwd=cwd, timeout=timeout, env=env)
    return _forkserver().run(argv, str(cwd), full, timeout)


# Variables an interpreter or a library reads when it starts or is imported (the fork server's
# parent read them once, with the test session's values): a request that sets one gets a fresh process.
FRESH_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONWARNINGS", "PYTHONHASHSEED", "PYTHONNOUSERSITE",
             "LD_PRELOAD", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_DISABLE_JIT")
_FORKSERVER_PYTHONPATH = pythonpath()


def forkserver_enabled() -> bool:
    """False when ZOO_TEST_FORKSERVER=0 or the OS has no fork: every `zoo` of the tests is a fresh interpreter."""
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and os.environ.get("ZOO_TEST_FORKSERVER", "1").strip() != "0"


class ForkServer:
    """The client of one tests/zoo_forkserver.py process (started on first use, one per pytest process)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zoo-forkserver-")
        self.path = os.path.join(self.dir, "sock")
        self.log = open(os.path.join(self.dir, "server.log"), "w+b")
        env = subprocess_env()  # run_zoo asks only while its PYTHONPATH is _FORKSERVER_PYTHONPATH
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zoo_forkserver.py"), self.path],
                                     cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        atexit.register(self.close)

    def _connect(self, start_timeout: float = 600) -> socket.socket:
        deadline = time.monotonic() + start_timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"the zoo fork server did not start:\n{self.log.read().decode()[-3000:]}")
            time.sleep(0.05)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        return sock

    def run(self, argv: list[str], cwd: str, env: dict[str, str], timeout: float | None) -> subprocess.CompletedProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

        def drain(fd: int) -> None:
            with os.fdopen(fd, "rb") as f:
                chunks[fd].append(f.read())

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for t in readers:
            t.start()
        try:
            with self._connect() as sock:
                body = json.dumps({"argv": argv, "cwd": cwd, "env": env, "timeout": timeout}).encode()
                socket.send_fds(sock, [struct.pack("!I", len(body)) + body], [out_w, err_w])
                os.close(out_w)
                os.close(err_w)
                out_w = err_w = -1  # the child (and whatever it starts) now holds the only write ends
                reply = json.loads(sock.makefile("rb").readline() or b"{}")
        finally:
            for fd in (out_w, err_w):
                if fd >= 0:
                    os.close(fd)
        for t in readers:
            t.join(timeout)
        stdout, stderr = (b"".join(chunks[fd]).decode(errors="replace") for fd in (out_r, err_r))
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        if "returncode" not in reply:
            raise RuntimeError(f"the zoo fork server refused the request: {reply}")
        return subprocess.CompletedProcess(argv, reply["returncode"], stdout, stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_SERVER: ForkServer | None = None
_SERVER_LOCK = threading.Lock()


def _forkserver() -> ForkServer:
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or _SERVER.proc.poll() is not None:
            _SERVER = ForkServer()
        return _SERVER
