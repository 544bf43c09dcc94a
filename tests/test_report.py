"""The run report: metrics.jsonl whatever the logger, the Dashboard's plots drawn for a person,
report/report.html self-contained, `zoo report RUN_DIR`, and the report in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.dashboard import Dashboard
from callbacks.fit_diagnosis import FitDiagnosis
from callbacks.metric_log import read_metric_log
from callbacks.plots import confusion_figure
from callbacks.run_report import RunReport, write_report
from tests.test_base import NUM_CLASSES, TinyData, model, trainer

EPOCHS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-epoch fit with no logger at all: the report must come from the run directory alone."""
    run = tmp_path_factory.mktemp("run")
    t = trainer(max_epochs=EPOCHS, default_root_dir=str(run), log_every_n_steps=2,
                callbacks=[FitDiagnosis(), Dashboard(num_images=8, num_wrong=4), RunReport()])
    t.fit(model(), datamodule=TinyData(n=32))  # 4 batches of 8 per epoch
    return run


def _pngs_in(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_metric_log_keeps_steps_and_epochs_without_a_logger(run_dir):
    steps, epochs, source = read_metric_log(run_dir)
    assert source == run_dir / "metrics.jsonl"
    assert [r["step"] for r in steps] == list(range(2, 4 * EPOCHS + 1, 2))  # every log_every_n_steps
    # the zoo's parameter groups by name (zoo/optim.py), as LearningRateMonitor logs them
    assert all("train/loss" in r and "lr/backbone" in r and "lr/head_no_decay" in r for r in steps), steps[0]
    assert all(r["throughput/img_per_s"] > 0 for r in steps)
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    for r in epochs:
        assert {"train/loss_epoch", "train/acc1", "val/loss", "val/acc1"} <= set(r), r
        assert r["diagnosis"] in ("fine", "underfitting", "overfitting") and r["diagnosis_reason"]


def test_report_is_one_self_contained_file_with_every_section(run_dir):
    report = run_dir / "report" / "report.html"
    html = report.read_text()
    assert "src=\"http" not in html and "<script" not in html  # nothing fetched, nothing run
    pngs = _pngs_in(html)
    assert len(pngs) == 5, len(pngs)  # curves, steps, confusion, wrong images, augmented batch
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    for name in ("curves.png", "steps.png", "confusion_matrix.png", "most_confident_wrong.png", "augmented_batch.png"):
        assert (run_dir / "report" / name).is_file(), name
    _, epochs, _ = read_metric_log(run_dir)
    assert f"{epochs[-1]['diagnosis'].upper()} (epoch {EPOCHS - 1})" in html  # the last verdict
    assert "Checkpoints" not in html  # this fit saved none: no empty section


def test_dashboard_plots_have_class_names_counts_and_captions(run_dir):
    plots = run_dir / "plots"
    meta = json.loads((plots / "val_confusion_matrix.json").read_text())
    assert meta["classes"] == [str(i) for i in range(NUM_CLASSES)] and meta["epoch"] == EPOCHS - 1
    wrong = json.loads((plots / "val_most_confident_wrong.json").read_text())
    assert wrong["items"] and all({"true", "predicted", "probability"} <= set(i) for i in wrong["items"])
    batch = json.loads((plots / "train_augmented_batch.json").read_text())
    assert len(batch["captions"]) == 8
    from PIL import Image

    with Image.open(plots / "val_confusion_matrix.png") as im:  # a figure with axes and a colour bar, not a bare heatmap
        assert im.width > im.height >= 400


def test_confusion_figure_names_the_classes_and_counts_every_cell():
    counts = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 9]])
    fig = confusion_figure(counts, ["cat", "dog", "owl"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "owl"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "owl"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["5", "1", "2", "7", "9"])
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"


def test_many_classes_give_the_most_confused_pairs(tmp_path):
    n = 40
    counts = torch.eye(n, dtype=torch.long) * 10
    counts[3, 17] = 6
    counts[8, 2] = 4
    (tmp_path / "plots").mkdir()
    torch.save(counts, tmp_path / "plots" / "val_confusion_matrix.pt")
    classes = [f"class{i:02d}" for i in range(n)]
    (tmp_path / "plots" / "val_confusion_matrix.json").write_text(json.dumps({"epoch": 4, "classes": classes}))
    html = write_report(tmp_path).read_text()
    assert not (tmp_path / "report" / "confusion_matrix.png").exists()
    rows = re.findall(r"<tr><td>(class\d\d)</td><td>(class\d\d)</td><td>(\d+)</td>", html)
    assert rows == [("class03", "class17", "6"), ("class08", "class02", "4")]
    assert "No epoch was recorded" in html  # and says why there are no curves


def test_report_shows_the_last_bn_check(tmp_path):
    (tmp_path / "bn_stats").mkdir()
    (tmp_path / "bn_stats" / "epoch=000-step=5.csv").write_text("layer,channels,mean_err\nstages.0.bn,8,0.9\n")
    (tmp_path / "bn_stats" / "epoch=001-step=10.csv").write_text("layer,channels,mean_err\nstages.0.bn,8,0.01\n")
    html = write_report(tmp_path).read_text()
    assert "BatchNorm health" in html and "epoch=001-step=10.csv" in html
    assert "<td>stages.0.bn</td><td>8</td><td>0.01</td>" in html and "0.9<" not in html


def test_report_reads_a_csv_logger_run(tmp_path):
    """A run made before metrics.jsonl existed, logged with CSVLogger: its curves still come out."""
    from lightning.pytorch.loggers import CSVLogger

    t = trainer(max_epochs=2, default_root_dir=str(tmp_path), log_every_n_steps=1,
                logger=CSVLogger(str(tmp_path), name="csv", version=""))
    t.fit(model(), datamodule=TinyData(n=16))
    steps, epochs, source = read_metric_log(tmp_path)
    assert source == tmp_path / "csv" / "metrics.csv"
    assert [r["epoch"] for r in epochs] == [0, 1] and all("val/acc1" in r for r in epochs)
    assert steps and all("train/loss" in r for r in steps)
    assert (tmp_path / "report" / "curves.png").exists() is False
    write_report(tmp_path)
    assert (tmp_path / "report" / "curves.png").is_file()


def test_zoo_report_command(run_dir, tmp_path, capsys):
    from launch.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == f"run report: {tmp_path / 'r' / 'report.html'}"
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------- in a browser
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


MARK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.title = "images " + imgs.length + " loaded " + imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>"""


def test_every_image_of_the_report_loads_in_chromium(run_dir, tmp_path):
    """Headless Chromium (Debian's ``chromium`` package) opens a copy of the report with a script
    that counts the images whose pixels decoded; the dumped DOM carries the count."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium): the browser check of the report is skipped")
    html = (run_dir / "report" / "report.html").read_text()
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", MARK + "</body>"))
    r = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r"<title>images (\d+) loaded (\d+)</title>", r.stdout)
    assert m, (r.stdout[-500:], r.stderr[-2000:])
    assert int(m.group(1)) == 5 and m.group(1) == m.group(2), m.group(0)


# ---------------------------------------------------------------------- through `zoo fit`
def test_zoo_fit_writes_the_report_without_a_logger(tiny_imagenet, tmp_path, capsys):
    from launch.cli import main
    from tests.helpers import REPO, tiny_data

    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
               "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0
    out = capsys.readouterr().out
    run = Path(out.split("run directory: ")[1].splitlines()[0])
    _, epochs, _ = read_metric_log(run)
    assert [r["epoch"] for r in epochs] == [0] and "val/acc1" in epochs[0]
    html = (run / "report" / "report.html").read_text()
    assert len(_pngs_in(html)) == 4  # curves, confusion, wrong images, augmented batch (2 steps: no step row)
    assert "last.ckpt" in html and "convnet" in html  # checkpoints and the config summary


@pytest.mark.slow
def test_zoo_fit_off_a_terminal_writes_lines_not_redrawn_bars(tiny_imagenet, tmp_path):
    """`zoo fit > log 2>&1` as under Slurm or nohup, on FFCV (its .beton writer's bar too): no
    carriage return, a few lines per epoch, and the report at the end."""
    from tests.helpers import CPU_TINY, REPO, ZOO, tiny_data

    log = tmp_path / "fit.log"
    with open(log, "w") as f:
        r = subprocess.run(
            [ZOO, "fit", "--config", str(REPO / "launch/recipes/demo.yaml"),
             *CPU_TINY, *tiny_data(tiny_imagenet, "ffcv", batch=2), "--trainer.max_epochs", "3",
             "--run.root", str(tmp_path / "runs"), "--run.logger", "csv"],
            cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert "\r" not in text
    epoch_lines = [ln for ln in text.splitlines() if re.match(r"epoch \d \(\d of 3\)", ln)]
    assert len(epoch_lines) == 1 + 3, epoch_lines  # the first batch, then one per epoch (9 batches < 50)
    assert len(text.splitlines()) < 60, text
    assert "run report: " in text
