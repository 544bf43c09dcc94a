"""What `zoo` prints: the run, progress and results, real warnings; no third-party notices (launch/output.py)."""

from __future__ import annotations

from launch.cli import main
from tests.test_bad_input import _tiny


def test_notices_hidden_real_warnings_kept(tiny_imagenet, tmp_path, capfd, caplog, recwarn):
    caplog.set_level("INFO")
    rc = main(["fit", *_tiny(), "--data.root", str(tiny_imagenet), "--trainer.fast_dev_run", "1",
               "--run.root", str(tmp_path), "--run.logger", "csv",
               "--model.schedule", "cyclic", "--model.peak_epoch", "5"])  # a real warning: the LR never comes down
    assert rc == 0
    cap = capfd.readouterr()
    text = cap.out + cap.err + caplog.text  # Lightning's notices are log records
    assert "run directory:" in text
    for notice in ("litlogger", "GPU available", "TPU available", "Seed set to"):
        assert notice not in text, notice
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "`srun` command is available" in m]
    assert [m for m in messages if "the cyclic LR never comes down" in m]
