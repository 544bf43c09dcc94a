"""Optimisation for ImageClassifier: parameter groups, the optimizer, the LR scaling rule and the
per-step LR schedule, as plain functions of the network, the trainer and the hyper-parameters.

What timm offers and why it is not used here (timm 1.0):

- ``timm.optim.param_groups_weight_decay`` splits decay / no-decay on the same rule (``ndim <= 1``
  or a bias), but puts every parameter in one group when ``weight_decay`` is 0, gives the
  no-decay group 0 (here ``norm_weight_decay``) and knows no head / backbone split
  (``backbone_lr_scale``). The groups here always exist and are named, so the LR monitor's keys
  (``lr/backbone``, ``lr/head_no_decay``...) and a checkpoint's optimizer state keep their layout
  whatever the weight decay.
- ``timm.optim.create_optimizer_v2``: its ``sgd`` is Nesterov SGD; ``torch.optim.SGD`` / ``AdamW``
  built from the groups are two lines.
- ``timm.scheduler.CosineLRScheduler`` (``warmup_prefix=True``, ``t_in_epochs=False``) computes
  the ``cosine`` factor of :func:`lr_factor` for a single parameter group (tests/test_base.py
  checks it against it). It differs with several groups: its warm-up start (``warmup_lr_init``)
  and floor (``lr_min``) are absolute learning rates shared by every group, where here they are
  fractions of each group's own peak (a backbone at ``backbone_lr_scale`` x the head's LR warms
  up and decays in proportion).
- ``timm.scheduler.MultiStepLRScheduler`` decays one step before each milestone (timm's ``t + 1``
  convention, kept there on purpose) and counts milestones after the warm-up; ``step`` here
  decays at epoch >= milestone from the start, as torch's ``MultiStepLR`` and He et al. 2016.
- ``cyclic`` (ffcv-imagenet's triangle from 1e-4 x the peak) has no timm counterpart.
- timm's schedulers are stepped with ``step_update(num_updates)`` outside torch's
  ``LRScheduler`` protocol; a ``LambdaLR`` over :func:`lr_factor` is what Lightning steps per
  optimizer step, and its state is what the checkpoints written so far hold (resuming needs it).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import nn

from . import heads

Schedule = Literal["cosine", "step", "cyclic", "constant"]


def lr_factor(
    step: int,
    *,
    steps_per_epoch: float,
    max_epochs: float,
    schedule: Schedule,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.0,
    peak_epoch: float = 2.0,
    milestones: Sequence[float] = (30, 60, 80),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (per-step, fractional epochs).

    - ``cosine``: linear warmup from ``warmup_start`` to 1 over ``warmup_epochs``, then a
      half cosine down to ``min_factor`` at ``max_epochs`` (Loshchilov & Hutter 2017).
    - ``step``: warmup, then ``gamma`` per milestone epoch passed (He et al. 2016: /10 at 30, 60, 80).
    - ``cyclic``: ffcv-imagenet's triangle: linear 1e-4 -> 1 at ``peak_epoch``, linear -> 0
      at ``max_epochs``, interpolated per step (get_cyclic_lr: np.interp([epoch],
      [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0]) in libffcv/ffcv-imagenet train_imagenet.py).
    - ``constant``: warmup, then 1.
    """
    epoch = step / max(steps_per_epoch, 1e-12)
    if schedule == "cyclic":
        # starts at 1e-4 of the peak, as ffcv-imagenet's get_cyclic_lr
        if epoch <= peak_epoch:
            return 1e-4 + (1.0 - 1e-4) * epoch / peak_epoch if peak_epoch > 0 else 1.0
        return max(0.0, (max_epochs - epoch) / max(max_epochs - peak_epoch, 1e-12))
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return warmup_start + (1.0 - warmup_start) * epoch / warmup_epochs
    if schedule == "cosine":
        span = max(max_epochs - warmup_epochs, 1e-12)
        progress = min(1.0, (epoch - warmup_epochs) / span)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, step, cyclic or constant")


def schedule_from_hparams(hp, *, steps_per_epoch: float, max_epochs: float) -> Callable[[int], float]:
    """``step -> LR factor`` (:func:`lr_factor`) with ImageClassifier's hyper-parameters."""

    def fn(step: int) -> float:
        return lr_factor(
            step, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs, schedule=hp.schedule,
            warmup_epochs=hp.warmup_epochs, warmup_start=hp.warmup_start, peak_epoch=hp.peak_epoch,
            milestones=hp.milestones, gamma=hp.gamma, min_factor=hp.min_lr_ratio,
        )

    return fn


def schedule_change_note(hp, old: Optional[dict], step: Optional[int], new_epochs: float, lr: float,
                         fn: Callable[[int], float]) -> Optional[str]:
    """One line when a resumed fit's trainer.max_epochs differs from the checkpoint's (``old``: the
    checkpoint's ``zoo_schedule``, ``step``: its global step): the LR schedule is recomputed over the
    new length (no new warmup), so the LR at the resumed step jumps from the old schedule's value to
    the new one's."""
    if not old or step is None or old.get("max_epochs") == new_epochs:
        return None
    before = lr * schedule_from_hparams(hp, steps_per_epoch=old["steps_per_epoch"], max_epochs=old["max_epochs"])(step)
    return (f"resume at step {step}: trainer.max_epochs {old['max_epochs']} -> {new_epochs} recomputes the "
            f"{hp.schedule} LR schedule over {new_epochs} epochs (no new warmup): the LR goes from "
            f"{before:.4g} to {lr * fn(step):.4g} here; keep --trainer.max_epochs {old['max_epochs']} "
            "to finish the original schedule")


# ----------------------------------------------------------------------------- batch and LR scaling
def loader_batch_size(loader) -> Optional[int]:
    """Per-device batch size of a train dataloader (torch DataLoader, FFCV Loader, ...)."""
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    bs = getattr(loader, "batch_size", None)
    if bs is None:  # DataLoader(batch_sampler=...) reports batch_size=None
        bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(bs) if isinstance(bs, int) and bs > 0 else None


def global_batch_size(trainer) -> Optional[int]:
    """Images per optimizer step over all processes: per-device batch of the train dataloader x
    ``trainer.world_size`` (devices x nodes) x ``accumulate_grad_batches``. Right for any
    DataModule, whether its own ``batch_size`` means the global batch (this project's) or the
    per-device one (Lightning's convention). ``None`` when the loader does not say its batch size."""
    per_device = loader_batch_size(trainer.train_dataloader)
    if per_device is None:
        return None
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


# ----------------------------------------------------------------------------- parameter groups
def param_groups(net: nn.Module, lr: float, *, weight_decay: float, norm_weight_decay: float,
                 backbone_lr_scale: float = 1.0) -> list[dict]:
    """Decay / no-decay x backbone / head groups of ``net``; frozen parameters are left out.

    No-decay: parameters with ``ndim <= 1`` (biases, BN/LN weights, layer-scale gammas) get
    ``norm_weight_decay`` (0: none, as ffcv-imagenet and torchvision's recipes). The backbone (all
    but the classifier head, :func:`zoo.heads.get_classifier`) gets ``lr x backbone_lr_scale``.
    Groups in a fixed order, named for the LR monitor (``lr/backbone``, ``lr/head_no_decay``, ...).
    """
    head_ids = {id(p) for p in heads.get_classifier(net).parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for _, p in net.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1
        groups.setdefault((no_decay, id(p) in head_ids), []).append(p)
    out = []
    for (no_decay, is_head), params in sorted(groups.items()):
        scale = 1.0 if is_head else backbone_lr_scale
        out.append(
            {
                # LearningRateMonitor logs lr/<name> (W&B: lr/backbone, lr/head_no_decay, ...)
                "name": ("head" if is_head else "backbone") + ("_no_decay" if no_decay else ""),
                "params": params,
                "weight_decay": norm_weight_decay if no_decay else weight_decay,
                "lr": lr * scale,
            }
        )
    return out


def describe_param_groups(groups: list[dict], frozen: int = 0) -> str:
    """One line per optimizer parameter group (name, peak LR, weight decay, parameter count), and
    the frozen parameters: what a backbone LR scale or a frozen backbone changed."""
    lines = [f"\n  {g.get('name', i):18s} peak lr {g['lr']:<10.4g} weight decay {g.get('weight_decay', 0):<8.3g} "
             f"{sum(p.numel() for p in g['params']):>12,} parameters" for i, g in enumerate(groups)]
    if frozen:
        lines.append(f"\n  {'frozen':18s} {'(not trained)':41s}{frozen:>12,} parameters")
    return "".join(lines)


def build_optimizer(name: str, groups: list[dict], lr: float, *, momentum: float = 0.9, nesterov: bool = False,
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``sgd`` (momentum, optional Nesterov) or ``adamw`` over ``groups`` (each with its own lr and decay)."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")
