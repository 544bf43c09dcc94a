"""Test harness: `zoo` processes forked from a parent that has imported the project once.

A `zoo` process spends 7-11 s on this project's 2-core test machine importing torch, Lightning,
ffcv and the project before its first step; the kill matrix and the DDP tests start dozens of them.
This server imports ``launch.cli`` (and what it pulls in) once, runs nothing, and forks one child
per request. Each child is a process of its own, as `subprocess.run([zoo, ...])` gives:

- its argv (``sys.argv[0]`` is the console script, so Lightning's DDP launcher starts the other
  ranks as ``python .venv/bin/zoo ...``: fresh interpreters), environment, working directory, and
  stdout/stderr pipes the client passed (its own and its children's output, read to EOF);
- stdin from /dev/null; numpy's global generator drawn afresh (``random`` reseeds itself at fork);
- it ends through the interpreter's normal exit (``SystemExit`` from ``main()``; atexit hooks run)
  or dies of its signal; the return code is subprocess's (-9 for SIGKILL), and a timeout kills it
  as ``subprocess.run`` would.

What a fork cannot show: import-time behaviour under the request's environment, and what the
imports print (a warning raised at import goes to the server's log, not to the child's stderr).
The project reads no environment at import (tests/test_forkserver.py checks it);
``tests.helpers.run_zoo`` starts a fresh process when a request changes PYTHONPATH or sets
PYTHON*/import-time variables, when asked (``fresh=True``: the console-script test does), or
when ZOO_TEST_FORKSERVER=0.

Protocol (AF_UNIX stream socket, one request per connection): the client sends a 4-byte length,
a JSON object {argv, cwd, env, timeout} and, with it, the write ends of two pipes (SCM_RIGHTS);
the server answers one JSON line {"returncode": int} or {"timeout": true}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

POLL_S = 0.02  # how often the server looks whether a child has ended (it has no threads to wait)


def _recv_exact(conn: socket.socket, n: int, fds: list[int]) -> bytes:
    buf = b""
    while len(buf) < n:
        data, got, _flags, _addr = socket.recv_fds(conn, n - len(buf), 2)
        fds.extend(got)
        if not data:
            raise ConnectionError("client closed the connection mid-request")
        buf += data
    return buf


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds: list[int] = []
    (size,) = struct.unpack("!I", _recv_exact(conn, 4, fds))
    request = json.loads(_recv_exact(conn, size, fds))
    if len(fds) != 2:
        raise ValueError(f"expected the stdout and stderr pipes with the request, got {len(fds)} descriptors")
    return request, fds


def _wait(pid: int, timeout: float | None) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if deadline is not None and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # subprocess.run kills the child (not its children) on timeout
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(POLL_S)


def serve(path: str) -> tuple[dict, list[int]] | None:
    """Answer requests until the parent (the pytest process) goes away. In a forked child this
    returns that child's request and pipes; in the server it returns None at the end."""
    parent = os.getppid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path + ".tmp")
    sock.listen(4)
    os.rename(path + ".tmp", path)  # the client connects once the path exists: the imports are done
    sock.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        with conn:
            try:
                request, fds = _read_request(conn)
            except (ConnectionError, ValueError, json.JSONDecodeError) as e:
                conn.sendall(json.dumps({"error": str(e)}).encode() + b"\n")
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sock.close()
                conn.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps(_wait(pid, request.get("timeout"))).encode() + b"\n")
    sock.close()
    return None


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `zoo ARGV` in the request's directory and environment."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    import numpy as np

    np.random.seed(int.from_bytes(os.urandom(4), "little"))  # a fresh interpreter draws its own state

    from launch.cli import main

    sys.exit(main())


# What a `zoo fit` imports before its first step (listed from sys.modules after a tiny fit on each
# backend; the optional ones skipped when not installed). Nothing a fit on one backend or the other
# would not import: a module imported here and not there could hide a missing import or registration.
PRELOAD = (
    "launch.cli", "launch.zoo_cli", "launch.defaults", "launch.safety", "launch.ckpt_config", "launch.output",
    "zoo.base", "callbacks.defaults", "callbacks.preemption", "datamodules.imagenet",
    "datamodules.torchvision_backend", "jsonargparse", "lightning.pytorch.loggers", "wandb", "matplotlib.pyplot",
)
OPTIONAL = ("datamodules.ffcv_backend",)  # the [ffcv] extra


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


if __name__ == "__main__":
    preload()
    job = serve(sys.argv[1])
    if job is not None:
        run_child(*job)
