"""The BN population estimator and the cross-rank reduction of BN buffers.

The estimator is written here (fvcore is not a dependency of this project and torch has only
``torch.optim.swa_utils.update_bn``, which uses a cumulative moving average of per-batch
*unbiased* variances, equal-weighted per batch, and no cross-rank reduction). It hooks each BN
layer's input with the BN layers in train mode (every later layer sees batch-normalised
activations, as in training) and everything else in eval mode (dropout and drop-path off),
and combines per-batch means and biased variances with Chan et al.'s parallel formula,
weighted by the number of values: pop_mean = E[x], pop_var = E[x^2] - pop_mean^2 with no
Bessel correction (as fvcore undoes it), then across ranks the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._batches import all_reduce, distributed, world_size

# pycls config NUM_SAMPLES_PRECISE = 8192 (pycls/core/config.py, "Rethinking 'Batch' in BatchNorm")
NUM_SAMPLES_PRECISE = 8192


def bn_layers(net: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers that keep running statistics, by qualified name."""
    return [
        (n, m) for n, m in net.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@contextlib.contextmanager
def bn_train_mode(net: nn.Module):
    """BN layers in train mode (batch statistics), everything else in eval mode; the modes and
    the BN buffers are restored afterwards (the forward passes leave no trace)."""
    modes = {m: m.training for m in net.modules()}
    layers = bn_layers(net)
    saved = {n: (m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for n, m in layers}
    net.eval()
    for _, m in layers:
        m.train()
    try:
        yield layers
    finally:
        for m, mode in modes.items():
            m.training = mode
        for n, m in layers:
            mean, var, nbt = saved[n]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. (1979) parallel update of (count, mean, sum of squared deviations)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


@torch.no_grad()
def estimate_population_stats(
    net: nn.Module, inputs: Iterable[torch.Tensor], num_samples: int = NUM_SAMPLES_PRECISE, reduce_ranks: bool = True
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Population mean and (biased) variance of every BN layer's input.

    Runs ``net`` on ``inputs`` until ``num_samples`` images (per rank: ``num_samples`` / world
    size) have been seen. Returns ``({layer: (mean, var)}, images used over all ranks)``.
    ``reduce_ranks``: combine the statistics of all DDP ranks (every rank must call).
    """
    layers = bn_layers(net)
    acc: dict[str, list] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()
            dims = [0] + list(range(2, x.ndim))
            n_b = float(x.numel() // x.shape[1])
            var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
            if name in acc:
                acc[name] = list(_combine(*acc[name], n_b, mean_b, var_b * n_b))
            else:
                acc[name] = [n_b, mean_b, var_b * n_b]
        return fn

    per_rank = math.ceil(num_samples / world_size()) if reduce_ranks else num_samples
    seen = 0
    with bn_train_mode(net):
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
        try:
            for x in inputs:
                net(x)
                seen += x.shape[0]
                if seen >= per_rank:
                    break
        finally:
            for h in handles:
                h.remove()
    total = torch.tensor([float(seen)], device=next(net.parameters()).device)
    if reduce_ranks:
        all_reduce(total, "sum")
    out = {}
    if not layers:
        return out, int(total.item())
    if reduce_ranks and distributed():
        # two all-reduces over one flat tensor each: global mean, then sum of squared deviations
        names = [n for n, _ in layers]
        for n, m in layers:  # a rank that saw nothing contributes zeros
            acc.setdefault(n, [0.0, torch.zeros_like(m.running_mean, dtype=torch.float32),
                               torch.zeros_like(m.running_var, dtype=torch.float32)])
        counts = torch.tensor([acc[n][0] for n in names], device=total.device, dtype=torch.float32)
        sums = torch.cat([acc[n][1] * acc[n][0] for n in names])
        g_counts = all_reduce(counts.clone(), "sum")
        g_sums = all_reduce(sums.clone(), "sum")
        offs, m2s = 0, []
        g_means = {}
        for i, n in enumerate(names):
            c = acc[n][1].numel()
            g_means[n] = g_sums[offs:offs + c] / g_counts[i].clamp_min(1)
            d = acc[n][1] - g_means[n]
            m2s.append(acc[n][2] + acc[n][0] * d * d)
            offs += c
        g_m2 = all_reduce(torch.cat(m2s), "sum")
        offs = 0
        for i, n in enumerate(names):
            c = acc[n][1].numel()
            out[n] = (g_means[n], g_m2[offs:offs + c] / g_counts[i].clamp_min(1))
            offs += c
    else:
        for n, (cnt, mean, m2) in acc.items():
            out[n] = (mean, m2 / max(cnt, 1.0))
    return out, int(total.item())


@torch.no_grad()
def apply_population_stats(net: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for n, m in bn_layers(net):
        if n in stats:
            mean, var = stats[n]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@contextlib.contextmanager
def using_stats(net: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """The given statistics in the BN buffers inside the block, the old ones after."""
    layers = bn_layers(net)
    saved = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers}
    apply_population_stats(net, stats)
    try:
        yield
    finally:
        apply_population_stats(net, saved)


@torch.no_grad()
def rank_max_diff(net: nn.Module) -> dict[str, float]:
    """Per BN layer, the largest |difference| of its running mean/var between any two ranks."""
    layers = bn_layers(net)
    if not layers or not distributed():
        return {n: 0.0 for n, _ in layers}
    flat = torch.cat([torch.cat([m.running_mean.float(), m.running_var.float()]) for _, m in layers])
    hi, lo = all_reduce(flat.clone(), "max"), all_reduce(flat.clone(), "min")
    diff, out, offs = hi - lo, {}, 0
    for n, m in layers:
        c = 2 * m.running_mean.numel()
        out[n] = float(diff[offs:offs + c].max())
        offs += c
    return out


@torch.no_grad()
def reduce_bn_buffers(tensors: list[torch.Tensor], op: Literal["mean", "broadcast"] = "mean") -> None:
    """Average (timm 'reduce') or broadcast from rank 0 (timm 'broadcast') in place, one
    collective over one flat tensor."""
    if not tensors or not distributed():
        return
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    if op == "mean":
        all_reduce(flat, "sum")
        flat /= world_size()
    else:
        torch.distributed.broadcast(flat, src=0)
    offs = 0
    for t in tensors:
        t.copy_(flat[offs:offs + t.numel()].view_as(t))
        offs += t.numel()
