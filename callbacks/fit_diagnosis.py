"""FitDiagnosis: after each validation, say whether the run underfits, overfits or is fine.

The course's rule of thumb, made explicit with numbers. It only reads the metrics the model
already logs (``train/loss``, ``train/acc1``, ``val/loss``, ``val/acc1``; zoo/base.py logs
them), so it costs nothing on the hot path. Per epoch that had a validation:

- **underfitting**: the training loss is still high, i.e. above ``underfit_loss_ratio`` (0.5)
  of the chance-level loss ``ln(num_classes)`` (the cross-entropy of a uniform prediction).
  The model has not even fitted its training set: more capacity, a better optimizer / LR,
  less regularisation, longer training (said when the train loss is still falling).
- **overfitting**: train accuracy is far above val accuracy (gap >= ``overfit_acc_gap``,
  0.10 = 10 points) *and* validation is getting worse: val loss at least ``val_rise`` (5 %)
  above its best so far. Regularise (weight decay, dropout), augment, get more data, or stop
  at the best epoch. Without train accuracy (mixup/cutmix give soft targets) the gap is
  measured on the losses: ``val_loss - train_loss >= overfit_loss_gap`` (0.5 nats).
- **fine** otherwise (a gap while val still improves is reported, not called overfitting).

The thresholds are this project's choices, not from a paper: 0.5 x chance loss separates
"learning barely started" from a fit even with label smoothing 0.1 (its floor at 10 classes
is 0.50 nats = 0.22 x ln 10); 10 points of accuracy gap and a 5 % rise of val loss over its
best are far above epoch-to-epoch noise on the embedded data (measured: val loss moves by
1-3 % between late demo epochs).

The verdict goes to the log (one line per validation, and a last one at the end of fit), to
logged scalars ``diagnosis/*`` (``diagnosis/verdict``: 0 fine, 1 underfitting, 2 overfitting)
and, with a W&B logger, to the run summary (``fit_diagnosis``, ``fit_diagnosis_reason``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

VERDICTS = ("fine", "underfitting", "overfitting")


@dataclass
class Diagnosis:
    epoch: int
    verdict: str
    reason: str
    train_loss: float
    val_loss: float
    train_acc1: Optional[float]
    val_acc1: Optional[float]
    best_val_loss: float
    train_loss_ratio: float  # train loss / ln(num_classes)
    val_loss_rise: float  # val loss / best val loss - 1
    train_loss_change: Optional[float]  # relative change since the previous validation (< 0: falling)

    def line(self) -> str:
        acc = lambda a: "n/a" if a is None else f"{a:.3f}"
        return (
            f"fit diagnosis (epoch {self.epoch}): {self.verdict.upper()} - {self.reason} "
            f"[train loss {self.train_loss:.4f} acc1 {acc(self.train_acc1)} | "
            f"val loss {self.val_loss:.4f} (best {self.best_val_loss:.4f}) acc1 {acc(self.val_acc1)}]"
        )


def _value(metrics: dict, *keys: str) -> Optional[float]:
    for k in keys:
        if k in metrics:
            v = float(metrics[k])
            if math.isfinite(v):
                return v
    return None


class FitDiagnosis(L.Callback):
    """Args (thresholds, see the module docstring for where they come from):
    underfit_loss_ratio: underfitting when train loss > this x ln(num_classes).
    overfit_acc_gap: train acc1 - val acc1 needed to call overfitting.
    overfit_loss_gap: val loss - train loss needed instead, when train acc1 is not logged.
    val_rise: relative rise of val loss above its best that counts as "val getting worse".
    falling: relative drop of train loss per validation that counts as "still falling".
    num_classes: for the chance-level loss; default ``pl_module.hparams.num_classes``.
    """

    def __init__(
        self,
        underfit_loss_ratio: float = 0.5,
        overfit_acc_gap: float = 0.10,
        overfit_loss_gap: float = 0.5,
        val_rise: float = 0.05,
        falling: float = 0.01,
        num_classes: Optional[int] = None,
    ) -> None:
        if not 0.0 < underfit_loss_ratio < 1.0:
            raise ValueError(f"FitDiagnosis underfit_loss_ratio must be in (0, 1), got {underfit_loss_ratio}")
        if not 0.0 < overfit_acc_gap < 1.0:
            raise ValueError(f"FitDiagnosis overfit_acc_gap must be in (0, 1), got {overfit_acc_gap}")
        if overfit_loss_gap <= 0 or val_rise < 0 or falling < 0:
            raise ValueError("FitDiagnosis overfit_loss_gap must be > 0, val_rise and falling >= 0")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"FitDiagnosis num_classes must be >= 2, got {num_classes}")
        self.underfit_loss_ratio = underfit_loss_ratio
        self.overfit_acc_gap = overfit_acc_gap
        self.overfit_loss_gap = overfit_loss_gap
        self.val_rise = val_rise
        self.falling = falling
        self.num_classes = num_classes
        self.history: list[dict] = []  # one Diagnosis (as dict) per validation
        self._validated = False

    # ---------------------------------------------------------------- state (resume)
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @property
    def last(self) -> Optional[Diagnosis]:
        return Diagnosis(**self.history[-1]) if self.history else None

    # ---------------------------------------------------------------- hooks
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning has reduced the epoch's train metrics by now (fit_loop.on_advance_end), and
        # the end-of-epoch validation ran before: both are in callback_metrics.
        if not self._validated:
            return
        self._validated = False
        d = self.diagnose(trainer.callback_metrics, trainer.current_epoch, self._classes(pl_module))
        if d is None:
            return
        self.history.append(asdict(d))
        rank_zero_info(d.line())
        pl_module.log_dict(
            {
                "diagnosis/verdict": float(VERDICTS.index(d.verdict)),
                "diagnosis/train_loss_ratio": d.train_loss_ratio,
                "diagnosis/val_loss_rise": d.val_loss_rise,
                **({"diagnosis/acc_gap": d.train_acc1 - d.val_acc1} if d.train_acc1 is not None and d.val_acc1 is not None else {}),
            },
            on_epoch=True,
            sync_dist=False,  # computed from already-reduced metrics: equal on every rank
        )
        self._summary(trainer, d)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.history and trainer.is_global_zero:
            rank_zero_info("final " + self.last.line())

    # ---------------------------------------------------------------- the rule
    def _classes(self, pl_module) -> int:
        n = self.num_classes or getattr(getattr(pl_module, "hparams", {}), "get", lambda k: None)("num_classes")
        if not n or n < 2:
            raise ValueError("FitDiagnosis needs num_classes (>= 2): pass FitDiagnosis(num_classes=...)")
        return int(n)

    def diagnose(self, metrics: dict, epoch: int, num_classes: int) -> Optional[Diagnosis]:
        """The verdict for one validation's metrics (``None`` if train or val loss is missing)."""
        train_loss = _value(metrics, "train/loss_epoch", "train/loss")
        val_loss = _value(metrics, "val/loss")
        if train_loss is None or val_loss is None:
            return None
        train_acc = _value(metrics, "train/acc1_epoch", "train/acc1")
        val_acc = _value(metrics, "val/acc1")
        best = min([h["val_loss"] for h in self.history] + [val_loss])
        rise = val_loss / max(best, 1e-12) - 1.0
        chance = math.log(num_classes)
        ratio = train_loss / chance
        prev = self.history[-1]["train_loss"] if self.history else None
        change = (train_loss - prev) / max(prev, 1e-12) if prev is not None else None
        still_falling = change is not None and change < -self.falling

        if ratio > self.underfit_loss_ratio:
            verdict = "underfitting"
            reason = (
                f"train loss {train_loss:.3f} is {ratio:.2f} x the chance level ln({num_classes}) = {chance:.3f} "
                f"(> {self.underfit_loss_ratio}); "
                + (
                    f"it is still falling ({100 * change:+.1f}% since the last validation): train longer"
                    if still_falling
                    else "more capacity, a better optimizer or learning rate, less regularisation, longer training"
                )
            )
        else:
            if train_acc is not None and val_acc is not None:
                gap, limit, what = train_acc - val_acc, self.overfit_acc_gap, "acc1 gap (train - val)"
            else:
                gap, limit, what = val_loss - train_loss, self.overfit_loss_gap, "loss gap (val - train)"
            if gap >= limit and rise >= self.val_rise:
                verdict = "overfitting"
                reason = (
                    f"{what} {gap:.3f} >= {limit} and val loss {100 * rise:.0f}% above its best "
                    f"(>= {100 * self.val_rise:.0f}%): regularise (weight decay, dropout), augment, "
                    "get more data, or keep the best checkpoint"
                )
            else:
                verdict = "fine"
                reason = f"train loss {ratio:.2f} x chance (<= {self.underfit_loss_ratio}), {what} {gap:.3f}" + (
                    f", val loss {100 * rise:.0f}% above its best" if rise > 0 else ", val loss at its best"
                )
        return Diagnosis(
            epoch=epoch, verdict=verdict, reason=reason, train_loss=train_loss, val_loss=val_loss,
            train_acc1=train_acc, val_acc1=val_acc, best_val_loss=best, train_loss_ratio=ratio,
            val_loss_rise=rise, train_loss_change=change,
        )

    @staticmethod
    def _summary(trainer, d: Diagnosis) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                summary = logger.experiment.summary
                summary["fit_diagnosis"] = d.verdict
                summary["fit_diagnosis_reason"] = d.reason
                summary["fit_diagnosis_epoch"] = d.epoch
