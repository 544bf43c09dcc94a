"""No loading path unpickles code; run names stay in the run root; no secret in what a run prints or writes."""

from __future__ import annotations

import pytest
import torch

from launch.cli import main
from tests.helpers import REPO
from tests.test_bad_input import MARKER, _tiny, evil_checkpoint

REFUSED = "contains pickled Python objects"


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / MARKER
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    # the payload is real: a plain torch.load(weights_only=False) runs it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    yield path, marker
    assert not marker.exists(), "unpickling ran code"


def test_zoo_load_refuses_code(evil):
    """zoo.load -> zoo.weights.load_weights: one line naming the file and the two safe formats."""
    import zoo
    from zoo.weights import WeightsError

    with pytest.raises(WeightsError) as e:
        zoo.load("convnet", weights=str(evil[0]))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{evil[0]} {REFUSED}")
    assert "torch.save(model.state_dict())" in msg and "safetensors" in msg


def test_torch_hub_local_refuses_code(evil):
    from zoo.weights import WeightsError

    with pytest.raises(WeightsError, match=REFUSED):
        torch.hub.load(str(REPO), "convnet", source="local", weights=str(evil[0]), trust_repo=True)


def test_lightning_resume_io_refuses_code(evil):
    """What Lightning calls to restore a run (fit --ckpt_path, validate --ckpt_path): the zoo's
    CheckpointIO loads with weights_only=True even when Lightning asks for weights_only=False."""
    from launch.safety import SafeCheckpointIO
    from zoo.weights import WeightsError

    with pytest.raises(WeightsError, match=REFUSED):
        SafeCheckpointIO().load_checkpoint(evil[0], weights_only=False)


# --ckpt_path is read by ZooCLI._parse_ckpt_path for every subcommand (fit stands for test/validate);
# --model.weights by zoo.weights through the model, the same for fit/validate/test/predict.
@pytest.mark.parametrize("how", ["fit --ckpt_path", "validate --model.weights", "ensemble"])
def test_cli_paths_refuse_code(how, evil, tiny_imagenet, tmp_path, capsys):
    sub, _, flag = how.partition(" ")
    if sub == "ensemble":
        rc = main(["ensemble", str(evil[0]), str(evil[0]), "--data.root", str(tiny_imagenet)])
    else:
        rc = main([sub, *_tiny(), "--data.root", str(tiny_imagenet), flag, str(evil[0]),
                   "--run.root", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err[-1].startswith("error: ") and REFUSED in err[-1], err[-3:]
    assert not (tmp_path / "runs").exists()


def test_run_name_cannot_leave_run_root(tmp_path, capsys):
    for name in ("../../x", "a/b", "..", "/etc"):
        assert main(["fit", *_tiny(), "--run.name", name, "--run.root", str(tmp_path / "runs")]) == 2
        assert "must be one folder name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_redact():
    from launch.safety import redact

    assert redact("https://alice:s3cr3tT0ken@example.com/w.pth") == "https://***:***@example.com/w.pth"
    assert redact("hf-hub:org/model?token=abc123") == "hf-hub:org/model?token=***"
    assert "hf_" + "a" * 30 not in redact("HF " + "hf_" + "a" * 30)


def test_no_secret_in_logs_or_saved_config(tiny_imagenet, tmp_path, capsys, monkeypatch):
    """A W&B key in the environment and a token in a weights URL appear in no file of the run
    and in nothing printed, also when the run fails."""
    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc = main(["fit", *_tiny(), "--data.root", str(tiny_imagenet), "--run.root", str(tmp_path / "runs"),
               "--trainer.limit_train_batches", "1"])
    assert rc == 0
    rc = main(["validate", *_tiny(), "--data.root", str(tiny_imagenet), "--run.root", str(tmp_path / "runs2"),
               "--model.weights", "https://alice:TOPSECRETTOKEN@127.0.0.1:9/w.pth"])
    assert rc == 2
    out = capsys.readouterr()
    printed = out.out + out.err
    assert key not in printed and "TOPSECRETTOKEN" not in printed
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    for p in files:
        data = p.read_bytes()
        assert key.encode() not in data, p


# ----------------------------------------------------------------------------- atomic checkpoints

_SAVER = """
import os, signal, sys, torch
from launch.safety import SafeCheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
io = SafeCheckpointIO() if sys.argv[2] == "safe" else None
path = sys.argv[1]
big = {"w": torch.arange(4_000_000, dtype=torch.float32)}
real = torch.save
def save(obj, f, *a, **k):  # the kill lands in the middle of writing the file
    real(obj, f, *a, **k)
    if hasattr(f, "flush"):
        f.truncate(f.tell() // 2); f.flush()
    else:
        os.truncate(f, os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
if io is not None:
    io.save_checkpoint(big, path)
else:  # a plain in-place save, to show the test can fail
    torch.save(big, path)
"""


@pytest.mark.parametrize("writer", ["safe", pytest.param("in_place", marks=[pytest.mark.slow, pytest.mark.xfail(strict=True, reason="the test's control: an in-place save leaves a broken file")])])
def test_kill_during_checkpoint_save_keeps_the_previous_file(writer, tmp_path):
    import subprocess
    import sys

    from launch.safety import SafeCheckpointIO

    last = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, last)
    r = subprocess.run([sys.executable, "-c", _SAVER, str(last), writer], cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -9
    assert torch.equal(torch.load(last, weights_only=True)["w"], torch.zeros(3))  # the old checkpoint, whole
