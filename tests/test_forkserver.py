"""tests/zoo_forkserver.py, the harness behind `tests.helpers.run_zoo`: a forked `zoo` must answer
as a fresh `zoo` process does (output, return code, directory, environment, timeout)."""

from __future__ import annotations

import ast
import subprocess

import pytest

from tests.helpers import DEMO, REPO, _forkserver, forkserver_enabled, run_zoo, tiny_data

needs_server = pytest.mark.skipif(not forkserver_enabled(), reason="ZOO_TEST_FORKSERVER=0 or no fork")


@needs_server
@pytest.mark.slow
@pytest.mark.parametrize("args", [["models", "res*"], ["fit", "--config", "no/such/recipe.yaml"], ["--help"]])
def test_a_forked_zoo_answers_as_a_fresh_one(args):
    """The same stdout, stderr and return code; `models` lists the registry a fresh process builds."""
    forked, fresh = run_zoo(args), run_zoo(args, fresh=True)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


@needs_server
@pytest.mark.slow
def test_a_forked_zoo_runs_in_the_requests_directory_and_environment(tiny_imagenet, tmp_path):
    r = run_zoo(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.fast_dev_run", "1",
                 "--run.root", "runs", "--run.name", "here", "--run.logger", "csv"],
                cwd=tmp_path, env={"ZOO_RUN_ID": "from-env"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run directory: {tmp_path / 'runs' / 'here' / 'from-env'}" in r.stdout


@needs_server
@pytest.mark.slow
def test_a_timeout_kills_the_forked_zoo_and_the_server_goes_on(tiny_imagenet, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_zoo(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.max_epochs", "100",
                 "--run.root", str(tmp_path), "--run.logger", "csv"], timeout=1)
    server = _forkserver()
    assert server.proc.poll() is None
    assert run_zoo(["models", "convnet"]).returncode == 0
    assert _forkserver() is server  # the same server answered


def _module_level_env_reads(path, root=REPO) -> list[str]:
    """`os.environ` / `os.getenv` evaluated when the module is imported (outside any function)."""
    tree = ast.parse(path.read_text(), str(path))
    inside_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                        for n in ast.walk(f) if n is not f}
    return [f"{path.relative_to(root)}:{n.lineno}" for n in ast.walk(tree)
            if id(n) not in inside_functions and isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv")]


def test_the_project_reads_no_environment_at_import():
    """The fork server's parent imported the project with the test session's environment: a module
    that read a variable at import would see that, not the request's. Read it where it is used."""
    found = [hit for pkg in ("zoo", "datamodules", "callbacks", "launch") for p in sorted((REPO / pkg).rglob("*.py"))
             for hit in _module_level_env_reads(p)]
    assert not found, f"environment read at import (the fork server cannot pass a request's value): {found}"


def test_the_env_scan_finds_a_module_level_read(tmp_path):
    (tmp_path / "m.py").write_text("import os\nX = os.environ.get('A')\nclass C:\n    Y = os.getenv('B')\n"
                                   "def f():\n    return os.getenv('C')\n")
    assert _module_level_env_reads(tmp_path / "m.py", tmp_path) == ["m.py:2", "m.py:4"]
