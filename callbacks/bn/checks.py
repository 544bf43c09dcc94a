"""The five checks of :class:`~callbacks.bn.stats_check.BNStatsCheck`, one function each.

Checks 1 to 3 look at one layer and return ``(table columns, findings)``; a finding is one
line naming the layer. Checks 4 and 5 look at the whole model.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._batches import all_reduce, iterate, precision_context, world_size
from .population import bn_train_mode, rank_max_diff, using_stats

HELDOUT_SIZE = 64  # images in check 4's held-out batch (a common per-GPU batch size)
HELDOUT_PER_BATCH = 8


def nonfinite_buffers(name: str, m: _BatchNorm) -> tuple[dict, list[str]]:
    """Check 1: NaN/Inf in running_mean/running_var; num_batches_tracked > 0."""
    nonfinite = int((~torch.isfinite(m.running_mean)).sum() + (~torch.isfinite(m.running_var)).sum())
    findings = []
    if nonfinite:
        findings.append(f"{name}: {nonfinite} NaN/Inf values in running_mean/running_var")
    if m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0:
        findings.append(f"{name}: num_batches_tracked is 0 (the running statistics were never updated)")
    return {"nonfinite": nonfinite}, findings


def collapsed_variance(name: str, m: _BatchNorm, collapse_factor: float) -> tuple[dict, list[str]]:
    """Check 2: channels with running_var < ``collapse_factor`` x eps."""
    collapsed = int((m.running_var < collapse_factor * m.eps).sum())
    findings = []
    if collapsed:
        findings.append(
            f"{name}: {collapsed}/{m.num_features} channels with running_var < {collapse_factor:g} x eps "
            f"(variance collapse)"
        )
    return {"collapsed": collapsed}, findings


def stale_statistics(
    name: str, m: _BatchNorm, mean_pop: torch.Tensor, var_pop: torch.Tensor, mean_tol: float, logvar_tol: float
) -> tuple[dict, list[str]]:
    """Check 3, per layer: running vs population statistics, the mean over channels of
    |mu_run - mu_pop| / sigma_pop and of |log(var_run / var_pop)|."""
    sigma = (var_pop + m.eps).sqrt()
    rel = ((m.running_mean.float() - mean_pop).abs() / sigma)
    logv = ((m.running_var.float() + m.eps) / (var_pop + m.eps)).log().abs()
    rel = torch.nan_to_num(rel, nan=math.inf)
    logv = torch.nan_to_num(logv, nan=math.inf)
    r_mean, r_var = float(rel.mean()), float(logv.mean())
    row = dict(mean_err=r_mean, mean_err_max=float(rel.max()), logvar=r_var, logvar_max=float(logv.max()))
    findings = []
    if r_mean > mean_tol or r_var > logvar_tol:
        findings.append(
            f"{name}: running statistics differ from the population's (mean error {r_mean:.3g} sigma, "
            f"|log var ratio| {r_var:.3g}): stale"
        )
    return row, findings


@torch.no_grad()
def val_accuracy(
    trainer, pl_module, stats, loader, k_val: int
) -> tuple[Optional[tuple[float, float]], Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Check 3, on the model: val accuracy on up to ``k_val`` images (all ranks) with the running
    and with the population statistics ``stats``. Also returns check 4's held-out batch: a few
    images from every val batch, so that it mixes classes (a sequential val loader gives one
    class per batch)."""
    if loader is None or k_val == 0:
        return None, None
    net = pl_module.net
    hits = torch.zeros(3, device=pl_module.device)  # running, recomputed, count
    picks_x, picks_y = [], []
    for x, y in iterate(loader, pl_module, max_samples=math.ceil(k_val / world_size())):
        if y is None:
            return None, None
        picks_x.append(x[:HELDOUT_PER_BATCH])
        picks_y.append(y[:HELDOUT_PER_BATCH].clone())  # FFCV reuses its batch buffers
        with precision_context(trainer):
            a = net(x).argmax(-1) == y
            with using_stats(net, stats):
                b = net(x).argmax(-1) == y
        hits += torch.stack([a.sum().float(), b.sum().float(), torch.full((), float(y.numel()), device=hits.device)])
    all_reduce(hits, "sum")
    heldout = None
    if picks_x:
        xs, ys = torch.cat(picks_x), torch.cat(picks_y)
        keep = torch.linspace(0, len(ys) - 1, min(HELDOUT_SIZE, len(ys)), device=ys.device).round().long()
        heldout = (xs[keep], ys[keep])
    n = max(float(hits[2]), 1.0)
    return (float(hits[0]) / n, float(hits[1]) / n), heldout


@torch.no_grad()
def train_eval_gap(trainer, pl_module, batch) -> Optional[tuple[float, float, float]]:
    """Check 4: on one held-out batch ``(x, y)``, accuracy with batch statistics, accuracy with
    running statistics, and the relative logit difference, averaged over ranks."""
    if batch is None or batch[1] is None or batch[0].shape[0] < 2:
        return None
    x, y = batch
    net = pl_module.net
    with precision_context(trainer):
        eval_logits = net(x).float()
        with bn_train_mode(net):
            train_logits = net(x).float()
    res = torch.stack([
        (train_logits.argmax(-1) == y).float().mean(), (eval_logits.argmax(-1) == y).float().mean(),
        (train_logits - eval_logits).norm() / train_logits.norm().clamp_min(1e-12),
    ])
    all_reduce(res, "sum")
    res /= world_size()
    return float(res[0]), float(res[1]), float(res[2])


def rank_differences(net: nn.Module, rank_tol: float) -> tuple[dict[str, float], list[str]]:
    """Check 5 (under DDP): the largest difference of each BN buffer across ranks."""
    diffs = rank_max_diff(net)
    findings = [f"{n}: BN buffers differ across ranks by up to {d:.3g}" for n, d in diffs.items() if d > rank_tol]
    return diffs, findings
