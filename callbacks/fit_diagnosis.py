"""FitDiagnosis: after each validation, say whether the run underfits, overfits, is not
learning at all, or is fine.

The course's rule of thumb, made explicit with numbers. It only reads the metrics the model
already logs (``train/loss``, ``train/acc1``, ``val/loss``, ``val/acc1``; zoo/base.py logs
them), the label smoothing and the optimizer's learning rate, so it costs nothing on the hot
path. It judges the training loss against what the loss can reach, not against chance alone:

- **chance** ``ln C``: the cross-entropy of a uniform prediction over C classes.
- **floor**: the lowest training loss label smoothing eps allows, the entropy of its target
  ``(1 - eps + eps/C)`` on the true class and ``eps/C`` on each other: 0 without smoothing,
  0.50 nats at eps 0.1 and 10 classes, 1.01 at 1000 (Szegedy et al. 2016 define the target).
- **loss progress** ``(chance - train loss) / (chance - floor)``: the share of the reachable drop
  already made (0 at chance, 1 at the floor); **accuracy progress**
  ``(acc1 - 1/C) / (1 - 1/C)``, the same for top-1 (the best of train and val top-1 counts:
  augmentation keeps train top-1 below val, mixup/cutmix do not log it).

Per epoch that had a validation, the first that applies:

1. **not learning**: the loss is NaN/inf, or above chance and rising (by more than ``falling``)
   or above 3 x chance (diverging: the learning rate is too high), or, from the
   second validation on, the training loss never made ``stuck_progress`` (5 %) of its reachable
   drop, is not falling now (by less than ``falling``, 1 %, since the last validation) and
   top-1 is less than half way from chance. Training longer will not help: the learning rate is
   too low to move the weights (it is named), or the data or gradients are broken
   (``zoo gradcheck``).
2. **overfitting**: train top-1 exceeds val top-1 by ``overfit_acc_gap`` (10 points) or more,
   or the val loss exceeds the training loss's excess over its floor by ``overfit_loss_gap``
   (0.5 nats) or more, *and* more training will not close the gap: val is getting worse (val
   loss ``val_rise``, 5 %, above its best), val has stopped improving (top-1 up by less than
   ``min_delta``, half a point, and val loss down by less than ``falling`` over the last
   ``patience``, 3, validations), or the training set is memorised (train top-1 >=
   ``fitted_acc``, 0.99). Regularise, augment, get more data, keep the best checkpoint.
3. **underfitting**: both the loss progress and the accuracy progress are below
   ``underfit_progress`` (0.5): the model has not fitted its own training set half way. Two
   causes, told apart by the trend: the training loss still falls (by more than ``falling``
   per validation): too few epochs, train longer; it has plateaued: more capacity, less
   regularisation, a better optimizer or learning rate (at the first validation there is no
   trend yet, and the line says so).
4. **fine** otherwise; a gap that is still closing is reported, with the val trend.

What the rule cannot know is the best error the task allows (label noise, ambiguous images):
a model plateaued at 70 % top-1 on a task where 95 % is reachable reads as fine. The thresholds
are this project's choices, not from a paper: half the reachable drop separates "learning
barely started" from a fit; 5 % of it is a loss that never left chance; 10 points of top-1
gap and a 5 % rise of val loss over its best are far above epoch-to-epoch noise on the
embedded data (measured: val loss moves by 1-3 % between late demo epochs).

The verdict goes to the log (one line per validation, and a last one at the end of fit), to
logged scalars ``diagnosis/*`` (``diagnosis/verdict``: 0 fine, 1 underfitting, 2 overfitting,
3 not learning) and, with a W&B logger, to the run summary (``fit_diagnosis``,
``fit_diagnosis_reason``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)

VERDICTS = ("fine", "underfitting", "overfitting", "not learning")


def loss_floor(num_classes: int, label_smoothing: float = 0.0) -> float:
    """The minimum cross-entropy against label-smoothed targets: the entropy of the target
    ``(1 - eps + eps/C)`` on the true class, ``eps/C`` on each of the other C - 1."""
    eps, c = float(label_smoothing), int(num_classes)
    if eps <= 0.0:
        return 0.0
    hi, lo = 1.0 - eps + eps / c, eps / c
    return -hi * math.log(hi) - (c - 1) * lo * math.log(lo)


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
    # defaults: histories saved before these fields existed still load
    loss_floor: float = 0.0  # the lowest train loss the label smoothing allows
    loss_progress: float = 0.0  # (chance - train loss) / (chance - floor)
    val_trend: str = ""  # improving, stalled, worse (or "" on the first validation)
    cause: str = ""  # not learning: diverged/stuck; underfitting: slow/plateau; overfitting: worse/stalled/memorised

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


def _raw(metrics: dict, *keys: str) -> Optional[float]:
    return next((float(metrics[k]) for k in keys if k in metrics), None)


class FitDiagnosis(L.Callback):
    """Args (thresholds, see the module docstring for the rule and where they come from):
    underfit_progress: underfitting when both the loss and the accuracy progress are below it.
    stuck_progress: not learning when the loss progress never reached it (and it is not falling).
    overfit_acc_gap: train acc1 - val acc1 that counts as a gap.
    overfit_loss_gap: val loss - (train loss - floor) that counts as a gap.
    val_rise: relative rise of val loss above its best that counts as "val getting worse".
    falling: relative drop of a loss per validation that counts as "still falling".
    min_delta: rise of val acc1 over ``patience`` validations that counts as "still improving".
    patience: validations over which val must improve (by ``min_delta`` or ``falling``).
    fitted_acc: train acc1 at which the training set counts as memorised.
    num_classes: for chance and floor; default ``pl_module.hparams.num_classes``.
    label_smoothing: for the floor; default ``pl_module.hparams.label_smoothing`` (else 0).
    """

    def __init__(
        self,
        underfit_progress: float = 0.5,
        stuck_progress: float = 0.05,
        overfit_acc_gap: float = 0.10,
        overfit_loss_gap: float = 0.5,
        val_rise: float = 0.05,
        falling: float = 0.01,
        min_delta: float = 0.005,
        patience: int = 3,
        fitted_acc: float = 0.99,
        num_classes: Optional[int] = None,
        label_smoothing: Optional[float] = None,
    ) -> None:
        for name, v in (("underfit_progress", underfit_progress), ("stuck_progress", stuck_progress),
                        ("overfit_acc_gap", overfit_acc_gap), ("fitted_acc", fitted_acc)):
            if not 0.0 < v < 1.0 + (name == "fitted_acc"):
                raise ValueError(f"FitDiagnosis {name} must be in (0, 1), got {v}")
        if stuck_progress >= underfit_progress:
            raise ValueError(f"FitDiagnosis stuck_progress ({stuck_progress}) must be below underfit_progress ({underfit_progress})")
        if overfit_loss_gap <= 0 or val_rise < 0 or falling < 0 or min_delta < 0 or patience < 1:
            raise ValueError("FitDiagnosis overfit_loss_gap must be > 0, val_rise, falling and min_delta >= 0, patience >= 1")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"FitDiagnosis num_classes must be >= 2, got {num_classes}")
        if label_smoothing is not None and not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"FitDiagnosis label_smoothing must be in [0, 1), got {label_smoothing}")
        self.underfit_progress = underfit_progress
        self.stuck_progress = stuck_progress
        self.overfit_acc_gap = overfit_acc_gap
        self.overfit_loss_gap = overfit_loss_gap
        self.val_rise = val_rise
        self.falling = falling
        self.min_delta = min_delta
        self.patience = patience
        self.fitted_acc = fitted_acc
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.history: list[dict] = []  # one Diagnosis (as dict) per validation
        self._validated = False

    # ---------------------------------------------------------------- state (resume)
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @property
    def last(self) -> Optional[Diagnosis]:
        if not self.history:
            return None
        known = {f.name for f in fields(Diagnosis)}
        return Diagnosis(**{k: v for k, v in self.history[-1].items() if k in known})

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
        d = self.diagnose(trainer.callback_metrics, trainer.current_epoch, self._classes(pl_module),
                          self._smoothing(pl_module), self._lr(trainer))
        if d is None:
            return
        self.history.append(asdict(d))
        _info(d.line())
        finite = lambda v: v if math.isfinite(v) else float("nan")
        pl_module.log_dict(
            {
                "diagnosis/verdict": float(VERDICTS.index(d.verdict)),
                "diagnosis/train_loss_ratio": finite(d.train_loss_ratio),
                "diagnosis/loss_progress": finite(d.loss_progress),
                "diagnosis/val_loss_rise": finite(d.val_loss_rise),
                **({"diagnosis/acc_gap": d.train_acc1 - d.val_acc1} if d.train_acc1 is not None and d.val_acc1 is not None else {}),
            },
            on_epoch=True,
            sync_dist=False,  # computed from already-reduced metrics: equal on every rank
        )
        self._summary(trainer, d)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.history and trainer.is_global_zero:
            _info("final " + self.last.line())

    # ---------------------------------------------------------------- the rule
    def _classes(self, pl_module) -> int:
        n = self.num_classes or getattr(getattr(pl_module, "hparams", {}), "get", lambda k: None)("num_classes")
        if not n or n < 2:
            raise ValueError("FitDiagnosis needs num_classes (>= 2): pass FitDiagnosis(num_classes=...)")
        return int(n)

    def _smoothing(self, pl_module) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return float(getattr(getattr(pl_module, "hparams", {}), "get", lambda k: None)("label_smoothing") or 0.0)

    @staticmethod
    def _lr(trainer) -> Optional[float]:
        try:
            return float(trainer.optimizers[0].param_groups[0]["lr"])
        except (AttributeError, IndexError, KeyError, TypeError):
            return None

    def _val_trend(self, val_loss: float, val_acc: Optional[float], rise: float) -> str:
        """worse (val loss above its best by val_rise), stalled (no gain over ``patience``
        validations), improving, or "" when there is no earlier validation to compare with."""
        if not self.history:
            return ""
        if rise >= self.val_rise:
            return "worse"
        if len(self.history) < self.patience:
            return "improving"
        past = self.history[-self.patience]
        loss_gain = (past["val_loss"] - val_loss) / max(past["val_loss"], 1e-12) >= self.falling
        acc_gain = val_acc is not None and past.get("val_acc1") is not None and val_acc - past["val_acc1"] >= self.min_delta
        return "improving" if loss_gain or acc_gain else "stalled"

    def diagnose(self, metrics: dict, epoch: int, num_classes: int, label_smoothing: float = 0.0,
                 lr: Optional[float] = None) -> Optional[Diagnosis]:
        """The verdict for one validation's metrics (``None`` if train or val loss is missing).
        Earlier validations come from ``self.history``; ``lr`` is only named in the advice."""
        raw_train = _raw(metrics, "train/loss_epoch", "train/loss")
        raw_val = _raw(metrics, "val/loss")
        if raw_train is None or raw_val is None:
            return None
        train_acc = _value(metrics, "train/acc1_epoch", "train/acc1")
        val_acc = _value(metrics, "val/acc1")
        chance = math.log(num_classes)
        floor = loss_floor(num_classes, label_smoothing)
        lr_text = f"lr {lr:.3g}" if lr is not None else "the learning rate"
        kw = dict(epoch=epoch, train_acc1=train_acc, val_acc1=val_acc, loss_floor=floor)

        if not (math.isfinite(raw_train) and math.isfinite(raw_val)):
            return Diagnosis(
                verdict="not learning", cause="diverged", train_loss=raw_train, val_loss=raw_val,
                best_val_loss=min([h["val_loss"] for h in self.history] or [raw_val]),
                train_loss_ratio=raw_train / chance, val_loss_rise=float("nan"), train_loss_change=None,
                loss_progress=float("nan"),
                reason=f"the loss is {raw_train if not math.isfinite(raw_train) else raw_val}: training diverged; "
                       f"{lr_text} is too high (lower it 3-10x, add warmup or gradient clipping), or the inputs hold NaN",
                **kw)
        train_loss, val_loss = raw_train, raw_val
        best = min([h["val_loss"] for h in self.history if math.isfinite(h["val_loss"])] + [val_loss])
        rise = val_loss / max(best, 1e-12) - 1.0
        progress = (chance - train_loss) / max(chance - floor, 1e-12)
        best_progress = max([h.get("loss_progress", -math.inf) for h in self.history] + [progress])
        prev = self.history[-1]["train_loss"] if self.history else None
        change = (train_loss - prev) / max(prev, 1e-12) if prev is not None else None
        still_falling = change is not None and change < -self.falling
        accs = [a for a in (train_acc, val_acc) if a is not None]
        acc_progress = (max(accs) - 1 / num_classes) / (1 - 1 / num_classes) if accs else None
        trend = self._val_trend(val_loss, val_acc, rise)
        kw.update(train_loss=train_loss, val_loss=val_loss, best_val_loss=best, train_loss_ratio=train_loss / chance,
                  val_loss_rise=rise, train_loss_change=change, loss_progress=progress, val_trend=trend)
        where = (f"train loss {train_loss:.3f}: {100 * progress:.0f}% of the way from chance ln({num_classes}) = {chance:.3f} "
                 f"to the floor {floor:.3f}" if progress >= 0 else
                 f"train loss {train_loss:.3f}: above chance ln({num_classes}) = {chance:.3f} (floor {floor:.3f})")
        if label_smoothing:
            where += f" (label smoothing {label_smoothing:g})"
        trend_text = {"": "first validation", "improving": "val still improving", "stalled":
                      f"val not improving over {self.patience} validations", "worse": f"val loss {100 * rise:.0f}% above its best"}[trend]

        # 1a. diverging: above chance and climbing (or far above it): steps too large
        if train_loss > chance and ((change is not None and change > self.falling) or train_loss > 3 * chance):
            return Diagnosis(
                verdict="not learning", cause="diverged",
                reason=f"train loss {train_loss:.4g} is above chance ln({num_classes}) = {chance:.3f}"
                       + (f" and rising ({100 * change:+.3g}% since the last validation)" if change is not None and change > 0 else "")
                       + f": training is diverging; {lr_text} is too high (lower it 3-10x, add warmup or gradient clipping)",
                **kw)

        # 1. not learning: the loss never left chance and does not move now (a trend needs an
        #    earlier validation: at the first one a slow start cannot be told from a stuck one)
        acc_text = "" if acc_progress is None else f", best top-1 {max(accs):.3f} ({100 * max(acc_progress, 0):.0f}% of the way from chance to 1)"
        low_acc = acc_progress is None or acc_progress < self.underfit_progress
        if self.history and best_progress < self.stuck_progress and not still_falling and low_acc:
            return Diagnosis(
                verdict="not learning", cause="stuck",
                reason=f"{where}, {100 * change:+.1f}% since the last validation{acc_text}: the loss has not moved "
                       f"from chance, so training longer will not help. The likeliest cause: {lr_text} is too low to move "
                       "the weights (raise it 10x at a time, or sweep it on a log scale); if it is not, check labels "
                       "and inputs, and zoo gradcheck",
                **kw)

        # 2. overfitting: a gap in accuracy or loss that more training will not close
        gaps = []
        if train_acc is not None and val_acc is not None and train_acc - val_acc >= self.overfit_acc_gap:
            gaps.append(f"top-1 gap {train_acc - val_acc:.3f} (train {train_acc:.3f}, val {val_acc:.3f}) >= {self.overfit_acc_gap}")
        loss_gap = val_loss - (train_loss - floor)
        if loss_gap >= self.overfit_loss_gap:
            gaps.append(f"loss gap {loss_gap:.3f} (val loss - train loss above its floor) >= {self.overfit_loss_gap}")
        memorised = train_acc is not None and train_acc >= self.fitted_acc
        if gaps and (trend in ("worse", "stalled") or memorised):
            cause = trend if trend in ("worse", "stalled") else "memorised"
            why = trend_text if cause != "memorised" else (
                f"train top-1 {train_acc:.3f} >= {self.fitted_acc}: the training set is memorised, more epochs cannot close the gap")
            return Diagnosis(
                verdict="overfitting", cause=cause,
                reason=f"{' and '.join(gaps)}; {why}: regularise (weight decay, dropout), augment, "
                       "get more data, or keep the best checkpoint",
                **kw)

        # 3. underfitting: not half way to fitting the training set, in loss and in accuracy
        if progress < self.underfit_progress and low_acc:
            if change is None:
                cause, advice = "", "first validation, no trend yet: a slow start and a stuck loss look alike"
            elif still_falling:
                cause, advice = "slow", (f"still falling ({100 * change:+.1f}% since the last validation): too few epochs, "
                                         f"train longer (or raise {lr_text})")
            else:
                cause, advice = "plateau", ("no longer falling: more capacity, less regularisation (weight decay, "
                                            "dropout, label smoothing), a better optimizer or learning rate")
            return Diagnosis(verdict="underfitting", cause=cause, reason=f"{where}{acc_text}; {advice}", **kw)

        # 4. fine
        if gaps:
            detail = f"; {' and '.join(gaps)}, but {trend_text}: watch it"
        else:
            detail = (f"; top-1 gap {train_acc - val_acc:+.3f}" if train_acc is not None and val_acc is not None else "") + f"; {trend_text}"
        return Diagnosis(verdict="fine", cause="", reason=f"{where}{detail}", **kw)

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
