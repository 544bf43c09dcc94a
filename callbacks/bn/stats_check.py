"""BNStatsCheck: five checks of every BatchNorm layer after each validation.

In eval mode a BN layer normalises with the exponential moving average of the batch
statistics it saw in training. When that average is stale (the weights moved faster than the
average), ranks disagree, or variances collapse, accuracy drops silently. The checks are in
:mod:`callbacks.bn.checks`, when they run in :mod:`callbacks.bn.schedule`, the per-layer table
in :mod:`callbacks.bn.table`.
"""

from __future__ import annotations

import math
import time
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from .._batches import as_list, batch_size_of, distributed, iterate, precision_context
from . import checks, schedule
from .common import SayOnce, extra_pass_allowed, say, train_inputs
from .population import NUM_SAMPLES_PRECISE, apply_population_stats, bn_layers, estimate_population_stats
from .schedule import MAX_OVERHEAD
from .table import write_table


class BNStatsError(RuntimeError):
    pass


class BNStatsCheck(L.Callback):
    """Five checks of every BatchNorm layer after each validation (or ``zoo validate``).

    1. NaN/Inf in running_mean/running_var; num_batches_tracked > 0.
    2. Variance collapse: channels with running_var < ``collapse_factor`` x eps.
    3. Running vs population statistics, re-estimated on ``num_samples`` training images
       (see :func:`estimate_population_stats`): per layer mean over channels of
       |mu_run - mu_pop| / sigma_pop and |log(var_run / var_pop)|; val accuracy on up to
       ``val_samples`` images with the running and with the recomputed statistics.
    4. Train/eval gap on one held-out batch (64 val images, a few from every val batch of
       check 3, so classes mix): accuracy and relative logit difference with batch
       statistics vs running statistics.
    5. Under DDP: the largest difference of each BN buffer across ranks.

    Summary scalars ``bn/*`` go to the logger each time; the per-layer table to a W&B table
    (``bn/layers``) with a WandbLogger, and to ``<run dir>/bn_stats/epoch=NNN.csv`` (for the run report). Each
    finding prints as one line naming the layer.

    Args:
        action: ``warn`` (print), ``recalibrate`` (on findings, apply the recomputed statistics,
            all-reduced across ranks, and log the accuracy before and after), ``fail`` (raise).
        mean_tol, logvar_tol: thresholds for check 3 (defaults: a mean off by 0.25 sigma, a
            variance off by a factor 1.5; this project's choice, no published standard).
        acc_tol: a val-accuracy loss of the running statistics against the recomputed ones
            (check 3) or of eval against train mode (check 4) above this is a finding.
        rank_tol: check 5 threshold on the absolute buffer difference.
        every_n_epochs: run after every n-th validation (epochs 0, n, 2n, ...). ``None`` (the
            default): chosen so that the checks cost at most ``max_overhead`` of the training
            compute. After the first train epoch the check counts, per rank, its own forward
            passes (3 x min(num_samples, train images) + 2 x min(val_samples, val images) + 2 x 64)
            against the epoch's (see ``check_cost``) and runs every n = ceil(ratio /
            max_overhead) epochs, counted back from the last epoch so that the final model is
            always checked. A fit shorter than n epochs is checked once, at its end, on fewer
            images: ``num_samples`` and ``val_samples`` scaled down so that the one check fits
            ``max_overhead`` of the fit, but not below ``min_samples`` each. On ImageNet
            (1.28 M train images, K = 8,192) n = 1; on the demo (2,944 train images, all of them
            one check at the full K) n = 57, so its 20-epoch fit gets one check on ~1,000 train
            and 256 val images. A count, not a timing: every rank and every rerun of a seed
            decides the same.
        max_overhead: the budget of ``every_n_epochs=None`` (issue #7's goal, 2%).
    """

    def __init__(
        self,
        num_samples: int = NUM_SAMPLES_PRECISE,
        val_samples: int = NUM_SAMPLES_PRECISE,
        action: Literal["warn", "recalibrate", "fail"] = "warn",
        collapse_factor: float = 10.0,
        mean_tol: float = 0.25,
        logvar_tol: float = math.log(1.5),
        acc_tol: float = 0.05,
        rank_tol: float = 1e-4,
        every_n_epochs: Optional[int] = None,
        max_overhead: float = MAX_OVERHEAD,
    ) -> None:
        if action not in ("warn", "recalibrate", "fail"):
            raise ValueError(f"BNStatsCheck action must be 'warn', 'recalibrate' or 'fail', got {action!r}")
        if num_samples < 1 or val_samples < 0 or (every_n_epochs is not None and every_n_epochs < 1):
            raise ValueError("BNStatsCheck needs num_samples >= 1, val_samples >= 0, every_n_epochs >= 1 (or None)")
        if not 0.0 < max_overhead <= 1.0:
            raise ValueError(f"BNStatsCheck max_overhead must be in (0, 1], got {max_overhead}")
        self.num_samples, self.val_samples, self.action = num_samples, val_samples, action
        self.collapse_factor, self.mean_tol, self.logvar_tol = collapse_factor, mean_tol, logvar_tol
        self.acc_tol, self.rank_tol, self.every_n_epochs = acc_tol, rank_tol, every_n_epochs
        self.max_overhead = max_overhead
        self.auto_every: Optional[int] = None  # every_n_epochs=None: decided after the first train epoch
        # (train, val) images of the one check of a fit too short for auto_every; None: the full K
        self.short_fit_samples: Optional[tuple[int, int]] = None
        self._train_images = self._val_images = 0
        self._ran_epoch: Optional[int] = None
        self._once = SayOnce()
        self.last_findings: list[str] = []
        self.last_summary: dict[str, float] = {}
        self.last_rows: list[dict] = []

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.auto_every is None:  # counted in the first epoch only
            self._train_images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.auto_every is None:
            self._train_images += batch_size_of(batch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.auto_every is None:
            self._val_images = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.auto_every is None and dataloader_idx == 0:
            self._val_images += batch_size_of(batch)

    @property
    def min_samples(self) -> int:
        """The fewest images a shrunken check uses (see :func:`callbacks.bn.schedule.min_samples`)."""
        return schedule.min_samples(self.mean_tol)

    def _samples(self, trainer) -> tuple[int, int]:
        """(train, val) images a check uses now: the shrunken pair of a fit too short for
        ``auto_every`` during that fit, else the full ``num_samples``/``val_samples`` (also in
        ``zoo validate``, which pays for one check only)."""
        if self.short_fit_samples and trainer.state.fn == "fit":
            return self.short_fit_samples
        return self.num_samples, self.val_samples

    def check_cost(self, samples: Optional[tuple[int, int]] = None) -> float:
        """One check's forward passes per rank as a fraction of one train epoch's compute (see
        :func:`callbacks.bn.schedule.check_cost`). ``samples``: (train, val) images, all ranks
        together (default: the full ``num_samples``, ``val_samples``)."""
        return schedule.check_cost(samples or (self.num_samples, self.val_samples), self._train_images, self._val_images)

    def _due(self, trainer) -> bool:
        epoch = trainer.current_epoch
        if trainer.state.fn != "fit":
            return True
        if self.every_n_epochs is not None:
            return epoch % self.every_n_epochs == 0
        if self.auto_every is None:
            if not self._train_images:  # validation before any training (val_check_interval)
                return False
            self.auto_every, self.short_fit_samples, line = schedule.plan(
                (self.num_samples, self.val_samples), self._train_images, self._val_images, self.max_overhead,
                self.min_samples, trainer.max_epochs)
            say(line)
        return schedule.due(epoch, self.auto_every, trainer.max_epochs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer, pl_module) -> list[str]:
        t0 = time.perf_counter()
        self._ran_epoch = trainer.current_epoch
        net = pl_module.net
        layers = bn_layers(net)
        self.last_findings, self.last_summary, self.last_rows = [], {}, []
        if not layers:
            self._once("nobn", "BNStatsCheck: the model has no BatchNorm layers with running statistics; nothing to check")
            return []
        was_training = pl_module.training
        pl_module.eval()
        findings: list[str] = []
        rows = {n: {"layer": n, "channels": m.num_features} for n, m in layers}
        summary: dict[str, float] = {}

        # 1. NaN/Inf, never updated; 2. collapsed variance
        bad = 0
        collapsed_total = 0
        for n, m in layers:
            for row, found in (checks.nonfinite_buffers(n, m), checks.collapsed_variance(n, m, self.collapse_factor)):
                rows[n].update(row)
                findings += found
            bad += bool(rows[n]["nonfinite"])
            collapsed_total += rows[n]["collapsed"]
        summary["bn/nonfinite_layers"] = float(bad)
        summary["bn/collapsed_channels"] = float(collapsed_total)

        # 3. running vs population statistics
        stats = None
        if not extra_pass_allowed(trainer):
            self._once("mid", "BNStatsCheck: validation in the middle of an epoch: check 3 (population statistics) "
                              "runs only at epoch ends")
        else:
            k_train = self._samples(trainer)[0]
            inputs = train_inputs(trainer, pl_module, k_train)
            if inputs is None:
                self._once("nodata", "BNStatsCheck: no training data in this stage; check 3 (population statistics) skipped")
            else:
                with precision_context(trainer):
                    stats, used = estimate_population_stats(net, inputs, k_train)
                if used < k_train:
                    self._once("few", f"BNStatsCheck: the train data gave {used} samples < {k_train} "
                                      "requested; estimated from all of them")
        heldout = None
        if stats:
            worst_mean = worst_var = 0.0
            for n, m in layers:
                row, found = checks.stale_statistics(n, m, *stats[n], self.mean_tol, self.logvar_tol)
                rows[n].update(row)
                findings += found
                worst_mean, worst_var = max(worst_mean, row["mean_err"]), max(worst_var, row["logvar"])
            summary["bn/mean_err_max"] = worst_mean
            summary["bn/logvar_max"] = worst_var
            acc, heldout = checks.val_accuracy(trainer, pl_module, stats, self._val_loader(trainer),
                                               self._samples(trainer)[1])
            if acc is not None:
                summary["bn/val_acc1_running"], summary["bn/val_acc1_recomputed"] = acc
                if acc[1] - acc[0] > self.acc_tol:
                    findings.append(
                        f"model: val accuracy {acc[0]:.4f} with the running statistics vs {acc[1]:.4f} recomputed"
                    )

        # 4. train/eval gap on a held-out batch (check 3's, else the first val batch)
        if heldout is None:
            loader = self._val_loader(trainer)
            heldout = next(iterate(loader, pl_module, max_batches=1), None) if loader is not None else None
        gap = checks.train_eval_gap(trainer, pl_module, heldout)
        if gap is not None:
            acc_train, acc_eval, logit_diff = gap
            summary["bn/heldout_acc1_batchstats"] = acc_train
            summary["bn/heldout_acc1_running"] = acc_eval
            summary["bn/heldout_logit_rel_diff"] = logit_diff
            if acc_train - acc_eval > self.acc_tol:
                findings.append(
                    f"model: held-out batch accuracy {acc_eval:.4f} with running statistics vs {acc_train:.4f} "
                    f"with batch statistics (logits differ by {logit_diff:.3g} relative)"
                )

        # 5. ranks
        if distributed():
            diffs, found = checks.rank_differences(net, self.rank_tol)
            for n, d in diffs.items():
                rows[n]["rank_max_diff"] = d
            findings += found
            summary["bn/rank_max_diff"] = max(diffs.values(), default=0.0)

        summary["bn/findings"] = float(len(findings))
        for f in findings:
            say(f"BNStatsCheck: {f}")
        if not findings:
            say(f"BNStatsCheck: {len(layers)} BN layers healthy")

        if findings and self.action == "recalibrate":
            if stats:
                apply_population_stats(net, stats)
                summary["bn/recalibrated"] = 1.0
                if "bn/val_acc1_running" in summary:
                    say(f"BNStatsCheck: recalibrated {len(layers)} BN layers: val accuracy "
                        f"{summary['bn/val_acc1_running']:.4f} -> {summary['bn/val_acc1_recomputed']:.4f}")
            else:
                say("BNStatsCheck: cannot recalibrate: no population statistics (no training data)")
        pl_module.train(was_training)
        summary["bn/check_seconds"] = time.perf_counter() - t0
        self.last_findings, self.last_summary, self.last_rows = findings, summary, list(rows.values())
        for k, v in summary.items():
            pl_module.log(k, v, sync_dist=False)
        self._write_table(trainer)
        if findings and self.action == "fail":
            raise BNStatsError(f"BNStatsCheck: {len(findings)} findings, first: {findings[0]}")
        return findings

    def state_dict(self) -> dict:
        # the period chosen in the first epoch: a resume from a mid-epoch checkpoint would count
        # a partial epoch and choose another
        return {"auto_every": self.auto_every, "short_fit_samples": self.short_fit_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.auto_every = state_dict.get("auto_every")
        short = state_dict.get("short_fit_samples")
        self.short_fit_samples = tuple(short) if short is not None else None

    def _val_loader(self, trainer):
        loaders = as_list(trainer.val_dataloaders)
        return loaders[0] if loaders else None

    @rank_zero_only
    def _write_table(self, trainer) -> None:
        path = write_table(trainer, self.last_rows)
        if path is not None:
            self.last_table = path
