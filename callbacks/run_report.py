"""The run report: one self-contained HTML page of what a run did, from its directory alone.

``write_report(run_dir)`` writes ``<run dir>/report/report.html`` (every image embedded as a
base64 PNG, so the file can be mailed or opened from a cluster's share without a server) and
the PNGs beside it:

- train and val loss and top-1 per epoch, the fit diagnosis marked where its verdict changed
  (``curves.png``); learning rate, throughput and train loss per step (``steps.png``), from the
  run's ``metrics.jsonl`` (:class:`~callbacks.metric_log.MetricLog`), or a CSVLogger's
  ``metrics.csv`` for a run without one: the same for W&B offline, CSV, TensorBoard or no logger;
- the last validation's confusion matrix with class names and counts (``confusion_matrix.png``),
  or above ``plots.MAX_LABELLED_CLASSES`` classes a table of the most confused pairs;
- the most confidently wrong images and the augmented first batch, captioned (the Dashboard's
  ``plots/``);
- the BatchNorm check's per-layer table when :class:`~callbacks.bn.stats_check.BNStatsCheck` ran;
- a summary of ``config.yaml`` (the full file folded) and the checkpoints.

:class:`RunReport` is the callback: a :class:`~callbacks.metric_log.MetricLog` that writes the
report at the end of every fit, on rank zero. ``zoo report RUN_DIR`` writes it for any run.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from .metric_log import MetricLog, read_metric_log

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "report.html"
# config keys shown in the summary table, in this order (the whole file is folded below it)
SUMMARY_KEYS = (
    "model.arch", "model.weights", "model.optimizer", "model.lr", "model.weight_decay", "model.schedule",
    "model.warmup_epochs", "model.label_smoothing", "data.root", "data.backend", "data.batch_size",
    "data.train_res", "data.val_res", "trainer.max_epochs", "trainer.precision", "trainer.devices",
    "trainer.num_nodes", "seed_everything", "run.logger", "ckpt_path",
)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _table(header: Optional[list[str]], rows: list[list[Any]]) -> str:
    head = "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _rel(path: Path, run_dir: Path) -> str:
    """A file of the run as a path inside the run directory (shown once, at the top)."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def _config(run_dir: Path) -> tuple[Optional[Path], dict]:
    for path in [run_dir / "config.yaml", *sorted(run_dir.glob("*/config.yaml"))]:
        if path.is_file():
            import yaml

            try:
                cfg = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                cfg = {}
            return path, cfg if isinstance(cfg, dict) else {}
    return None, {}


def _lookup(cfg: dict, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class _Page:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[str] = []

    def section(self, title: str, body: str) -> None:
        self.parts.append(f"<section><h2>{_esc(title)}</h2>{body}</section>")

    def figure(self, fig, name: str, alt: str) -> str:
        from .plots import save

        path = save(fig, self.out / name)
        return _img(path, alt)

    def copy(self, src: Path, name: str, alt: str) -> str:
        dst = self.out / name
        shutil.copyfile(src, dst)
        return _img(dst, alt)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` (default into ``run_dir/report``); returns the HTML file."""
    from . import plots

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(out)
    steps, epochs, source = read_metric_log(run_dir)
    cfg_path, cfg = _config(run_dir)

    # ------------------------------------------------------------------ summary
    last = epochs[-1] if epochs else {}
    facts = [["run directory", str(run_dir.resolve())]]
    if cfg:
        facts.append(["model", f"{_lookup(cfg, 'model.arch')}"])
    for key, label in (("val/acc1", "last val top-1"), ("val/acc5", "last val top-5"), ("val/loss", "last val loss")):
        if key in last:
            facts.append([label, f"{last[key]:.4f} (epoch {last['epoch']})"])
    best = max((r for r in epochs if "val/acc1" in r), key=lambda r: r["val/acc1"], default=None)
    if best is not None:
        facts.append(["best val top-1", f"{best['val/acc1']:.4f} (epoch {best['epoch']})"])
    judged = [r for r in epochs if r.get("diagnosis")]
    if judged:
        facts.append(["fit diagnosis", f"{judged[-1]['diagnosis'].upper()} (epoch {judged[-1]['epoch']}): "
                                       f"{judged[-1].get('diagnosis_reason', '')}"])
    facts.append(["metrics read from", _rel(source, run_dir) if source else "none (no metrics.jsonl or csv/metrics.csv)"])
    page.section("Summary", _table(None, facts))

    # ------------------------------------------------------------------ curves
    if epochs:
        body = page.figure(plots.curves_figure(epochs), "curves.png", "loss and top-1 per epoch")
        changes = plots.diagnosis_changes(epochs)
        if changes:
            body += _table(["from epoch", "fit diagnosis", "why"], [[e, v.upper(), r] for e, v, r in changes])
        page.section("Loss and accuracy per epoch", body)
    else:
        page.section("Loss and accuracy per epoch", "<p>No epoch was recorded: the run kept no metric log "
                     "(runs keep <code>metrics.jsonl</code> since the MetricLog callback; a CSVLogger's "
                     "<code>metrics.csv</code> is read too).</p>")
    if steps:
        page.section("Learning rate, throughput and loss per step",
                     page.figure(plots.steps_figure(steps), "steps.png", "learning rate, throughput and loss per step"))

    # ------------------------------------------------------------------ confusion
    plots_dir = run_dir / "plots"
    cm_path = plots_dir / "val_confusion_matrix.pt"
    if cm_path.is_file():
        import torch

        counts = torch.load(cm_path, map_location="cpu", weights_only=True).numpy()
        meta = _json(plots_dir / "val_confusion_matrix.json")
        n = counts.shape[0]
        classes = meta.get("classes") if isinstance(meta.get("classes"), list) and len(meta["classes"]) == n else [
            str(i) for i in range(n)]
        when = f"validation, epoch {meta['epoch']}" if "epoch" in meta else "last validation"
        if n <= plots.MAX_LABELLED_CLASSES:
            body = page.figure(plots.confusion_figure(counts, classes, title=when), "confusion_matrix.png",
                               "confusion matrix with class names and counts")
        else:
            pairs = plots.most_confused(counts, classes, k=25)
            body = (f"<p>{n} classes ({when}): the most confused pairs, largest first.</p>"
                    + _table(["true class", "predicted as", "images", "share of the true class"],
                             [[a, b, c, f"{s:.1%}"] for a, b, c, s in pairs]))
        page.section("Confusion matrix", body)

    # ------------------------------------------------------------------ images
    for stem, title, name in (
        ("val_most_confident_wrong", "The most confidently wrong validation images", "most_confident_wrong.png"),
        ("train_augmented_batch", "The augmented training batch", "augmented_batch.png"),
    ):
        png = plots_dir / f"{stem}.png"
        if png.is_file():
            meta = _json(plots_dir / f"{stem}.json")
            caption = ", ".join(meta.get("captions", [])) if isinstance(meta.get("captions"), list) else ""
            page.section(title, page.copy(png, name, title + (f": {caption}" if caption else "")))

    # ------------------------------------------------------------------ BN health
    bn = sorted((run_dir / "bn_stats").glob("*.csv"))
    if bn:
        with open(bn[-1], newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            page.section("BatchNorm health", f"<p>{_esc(bn[-1].name)} (the last check)</p>" + _table(rows[0], rows[1:]))

    # ------------------------------------------------------------------ config, checkpoints
    if cfg_path is not None:
        summary = [[k, _fmt(v)] for k in SUMMARY_KEYS if (v := _lookup(cfg, k)) is not None]
        body = _table(["setting", "value"], summary) if summary else ""
        body += (f"<details><summary>{_esc(_rel(cfg_path, run_dir))} (all of it)</summary>"
                 f"<pre>{_esc(cfg_path.read_text())}</pre></details>")
        page.section("Configuration", body)
    ckpts = sorted([*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")])
    if ckpts:
        page.section("Checkpoints", _table(["file (in the run directory)", "size", "written"], [
            [_rel(p, run_dir), f"{p.stat().st_size / 2**20:.1f} MiB",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime))] for p in ckpts]))

    report = out / REPORT_FILE
    report.write_text(_HTML.format(title=_esc(f"Run report: {run_dir.name}"), body="\n".join(page.parts)))
    return report


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1250px; margin: 1em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
img {{ max-width: 100%; height: auto; display: block; margin: .5em 0; }}
table {{ border-collapse: collapse; font-size: .85em; margin: .5em 0; }}
td, th {{ border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} pre {{ font-size: .8em; background: #f8f8f8; padding: .5em; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


class RunReport(MetricLog):
    """:class:`~callbacks.metric_log.MetricLog` plus the report at the end of every fit (rank zero).

    A report that cannot be written (a full disk, an unreadable file) is a warning: the fit's
    checkpoints are already saved, so it never fails the run.
    """

    def __init__(self, filename: str = "metrics.jsonl", every_n_steps: Optional[int] = None,
                 report: bool = True) -> None:
        super().__init__(filename=filename, every_n_steps=every_n_steps)
        self.report = report

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        if not (self.report and trainer.is_global_zero):
            return
        try:
            path = write_report(trainer.default_root_dir)
        except Exception as e:  # noqa: BLE001 - a report never fails a finished fit
            log.warning("run report not written: %s", e)
            return
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"run report: {path}")
