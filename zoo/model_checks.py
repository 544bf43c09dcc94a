"""Checks of a model that need no data: gradient check and initialisation statistics
(``zoo gradcheck`` and ``zoo init-stats``, launch/model_checks_cmd.py).

**Gradient check** (:func:`gradcheck`): the backprop gradient of a cross-entropy loss against
the central finite difference ``(L(w + h) - L(w - h)) / 2h`` on a few random entries of every
parameter tensor of a small float64 instance, on a random batch. Relative error
``|a - n| / max(|a|, |n|)`` as in CS231n's "gradient checks" notes: in float64 below 1e-7 is
right, up to 1e-4 is acceptable for nets with kinks (ReLU, max-pool), above 1e-2 the backward
is wrong. The default threshold is 1e-4. Entries where both gradients are below ``1e-9``
(in absolute value) carry no information about relative error and count as passing; their
absolute difference is still shown.

BatchNorm runs in eval mode (its running statistics): in train mode every sample's output
depends on the whole batch through the batch mean/variance, which is still a deterministic
function and would check fine, but it would update the running statistics on each of the
2 x entries forward passes. Dropout and DropConnect are off in eval mode (random masks make
the finite difference meaningless). So the check covers the layers' own backward, BN as the
affine map it is at inference.

**Initialisation statistics** (:func:`init_stats`): forward a standard-normal batch through
a freshly built model and record, after every activation and at the logits, the mean, the
variance and the mean square ``E[a^2]``. The fan-in argument (zoo/init.py) keeps ``E[a^2]``
(what the next layer's ``Var(z) = n Var(W) E[a^2]`` sees) at the input's 1; after a ReLU the
variance proper is ``E[a^2] - E[a]^2``, about 0.66 ``E[a^2]``. Compared against the other
schemes of zoo/init.py (xavier, N(0, 1), ``0.01 * N(0, 1)``, the course's "small random
numbers"). ``E[a^2]`` alone misjudges saturating units: a sigmoid pinned at 0 or 1 has
``E[a^2]`` near 0.5, inside any "within x2" band, yet passes almost no gradient; so sigmoid
and tanh rows also give the fraction of saturated outputs, and every row the variance of the
back-propagated gradient, which shows the signal dying toward the input. BatchNorm in eval
mode: freshly built it is the identity, so the statistics show what the weights do, not what
batch normalisation repairs in train mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import init, registry

# Small instances for the zoo's own families: a few thousand parameters, a check in seconds.
SMALL_ARCH_ARGS: dict[str, dict] = {
    "logreg": {"input_size": 8},
    "mlp": {"input_size": 8, "width": 16, "depth": 2},
    "convnet": {"widths": (4, 8), "depths": 1},
}
SMALL_INPUT_SIZE = {"logreg": 8, "mlp": 8}  # fixed-input nets; others run at 16 px by default


# ----------------------------------------------------------------------------- gradient check
@dataclass
class GradRow:
    param: str
    index: tuple
    backprop: float
    numeric: float
    rel_error: float

    @property
    def abs_error(self) -> float:
        return abs(self.backprop - self.numeric)


def relative_error(a: float, n: float, floor: float = 1e-9) -> float:
    denom = max(abs(a), abs(n))
    return 0.0 if denom < floor else abs(a - n) / denom


def gradcheck(
    net: nn.Module,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    per_tensor: int = 3,
    batch_size: int = 4,
    eps: float = 1e-6,
    seed: int = 0,
    progress: Optional[Callable] = None,
) -> list[GradRow]:
    """Backprop vs central differences on ``per_tensor`` random entries of each parameter.

    ``net`` is converted to float64 and put in eval mode (see the module docstring). Returns one
    row per checked entry; ``progress`` wraps the list of entries (e.g. ``tqdm``).
    """
    g = torch.Generator().manual_seed(seed)
    net = net.double().eval()
    x = torch.randn(batch_size, *input_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)

    def loss() -> torch.Tensor:
        # sum, not mean: larger gradients, less round-off in the finite difference
        return F.cross_entropy(net(x), y, reduction="sum")

    net.zero_grad(set_to_none=True)
    loss().backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    entries = []
    for name, p in params:
        if p.grad is None:
            raise ValueError(f"parameter {name} gets no gradient from the loss; is it used in forward?")
        k = min(per_tensor, p.numel())
        for flat in torch.randperm(p.numel(), generator=g)[:k].tolist():
            entries.append((name, p, flat))
    rows = []
    with torch.no_grad():
        for name, p, flat in progress(entries) if progress else entries:
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), p.shape))
            w0 = p[idx].item()
            p[idx] = w0 + eps
            up = loss().item()
            p[idx] = w0 - eps
            down = loss().item()
            p[idx] = w0
            numeric = (up - down) / (2 * eps)
            analytic = p.grad[idx].item()
            rows.append(GradRow(name, idx, analytic, numeric, relative_error(analytic, numeric)))
    return rows


def small_instance(arch: str, num_classes: int = 5, **arch_args) -> tuple[nn.Module, tuple[int, int, int]]:
    """A small network of ``arch`` (``SMALL_ARCH_ARGS`` for the zoo's own) and its input shape."""
    kwargs = {**SMALL_ARCH_ARGS.get(arch, {}), **arch_args}
    net = init.build(registry.get_entry(arch).builder, num_classes=num_classes, arch_args=kwargs)
    size = int(kwargs.get("input_size", SMALL_INPUT_SIZE.get(arch, 16)))
    return net, (int(kwargs.get("in_chans", 3)), size, size)


# ----------------------------------------------------------------------------- init statistics
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Tanh, nn.ReLU6, nn.LeakyReLU, nn.Hardswish)

# Saturation: the unit's local gradient is below ~1/5 of its maximum. sigmoid' = s (1 - s) is
# 0.0475 at s = 0.05 or 0.95 (max 0.25); tanh' = 1 - a^2 is 0.0975 at |a| = 0.95 (max 1).
# This project's thresholds for the course's "saturated units kill the gradient" (CS231n;
# Glorot & Bengio 2010 watch the same sigmoid outputs pinned near 0 or 1).
SATURATION = {nn.Sigmoid: (0.05, 0.95), nn.Tanh: (-0.95, 0.95)}
SATURATION_FLAG = 0.2  # a row is flagged when a fifth or more of its outputs are saturated


@dataclass
class LayerStat:
    layer: str
    mean: float
    var: float
    mean_square: float  # E[a^2]: what the fan-in derivation keeps at 1
    saturated: Optional[float] = None  # fraction of saturated outputs (sigmoid/tanh only)
    grad_var: Optional[float] = None  # Var(dL/da) of the summed cross-entropy: the backward signal

    @property
    def flagged(self) -> bool:
        return self.saturated is not None and self.saturated >= SATURATION_FLAG


def init_stats(net: nn.Module, input_shape: tuple[int, int, int], *, batch_size: int = 64, seed: int = 0) -> list[LayerStat]:
    """Per-activation and logit statistics of ``net`` (eval mode) on a N(0, 1) batch.

    The first row is the input itself. An activation module called several times (torchvision's
    shared ``relu``) gives one row per call (``name#2``, ...). Sigmoid and tanh rows carry the
    fraction of saturated outputs (:data:`SATURATION`); every row the variance of the gradient
    of the cross-entropy (summed over the batch, against random labels) with respect to it, one
    backward pass: the signal that reaches the layer (the input row: what reaches the image).
    The network's parameter gradients are cleared afterwards.
    """
    net = net.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=g).requires_grad_(True)
    seen: list[tuple[str, nn.Module, torch.Tensor]] = [("input", None, x)]
    calls: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if output.requires_grad:
                output.retain_grad()
            seen.append((name if calls[name] == 1 else f"{name}#{calls[name]}", module, output))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if isinstance(m, ACTIVATIONS)]
    try:
        out = net(x)
    finally:
        for h in handles:
            h.remove()
    out.retain_grad()
    seen.append(("logits", None, out))
    try:
        y = torch.randint(0, out.shape[-1], (batch_size,), generator=g)
        F.cross_entropy(out.float(), y, reduction="sum").backward()
    except RuntimeError:  # an in-place op on a hooked output: statistics without gradients
        pass
    finally:
        net.zero_grad(set_to_none=True)
    stats = []
    for name, module, t in seen:
        grad = t.grad
        stats.append(_stat(name, t.detach(), module, None if grad is None else grad.detach()))
    return stats


def _stat(name: str, t: torch.Tensor, module: Optional[nn.Module] = None, grad: Optional[torch.Tensor] = None) -> LayerStat:
    t = t.double()
    saturated = None
    bounds = next((b for cls, b in SATURATION.items() if isinstance(module, cls)), None)
    if bounds is not None:
        saturated = ((t < bounds[0]) | (t > bounds[1])).double().mean().item()
    return LayerStat(name, t.mean().item(), t.var().item(), t.square().mean().item(), saturated,
                     None if grad is None else grad.double().var().item())


def max_scale_drift(stats: list[LayerStat]) -> float:
    """The largest factor by which ``E[a^2]`` departs from 1 over the layers (>= 1; inf if 0/inf)."""
    worst = 1.0
    for s in stats:
        ms = s.mean_square
        if not math.isfinite(ms) or ms <= 0:
            return math.inf
        worst = max(worst, ms, 1.0 / ms)
    return worst
