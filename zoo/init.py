"""Weight initialisation: fan-in scaled for the zoo's own families (logreg, mlp, convnet), and
the schemes a student compares (fan_in, xavier, normal, small) for any network.

Why the weight variance goes as 1/fan_in (the forward-pass variance argument):

    z_j = sum_{i=1..n} W_ji a_i + b_j,   n = fan_in (in_features, or in_channels * k * k)

With W_ji drawn i.i.d., zero-mean, independent of the inputs a_i, and b = 0:

    Var(z_j) = n * Var(W) * E[a_i^2]

so the pre-activations keep the same scale from layer to layer when

    n * Var(W) * E[a^2] / Var(z_prev) = 1.

- ReLU (He et al. 2015, "Delving deep into rectifiers"): a = max(0, z) with z symmetric
  about 0 gives E[a^2] = Var(z) / 2, hence Var(W) = 2 / n  (gain^2 = 2, std = sqrt(2/n)).
  GELU is ReLU-like (x * Phi(x)); He's gain is the usual choice for it too (timm, BERT-style
  nets use comparable scales), so it gets gain^2 = 2 here.
- Sigmoid / linear / the output layer (LeCun et al. 1998, "Efficient BackProp"):
  treat the unit as linear around its operating point, E[a^2] ~ Var(z), hence
  Var(W) = 1 / n  (gain 1). Glorot & Bengio (2010, "Xavier") average fan_in and fan_out to
  also keep backward gradients in scale; with fan_in = fan_out it is the same number.

If the variance is too small the signal (and gradient) shrinks geometrically with depth; too
large and it explodes; the 1/fan_in scaling keeps deep MLPs/convnets trainable without
normalisation layers.

Schemes a student can choose (``arch_args={"init": ...}`` on any zoo model, and the columns
of ``zoo init-stats``), weights of every Linear/Conv, biases zero, norm layers untouched:

- ``fan_in`` (the default of logreg, mlp, convnet): N(0, gain^2 / fan_in), He's gain^2 = 2
  before ReLU/GELU, LeCun's 1 before sigmoid/tanh and the logits. The zoo's own families know
  each layer's activation; other families get He's gain for every layer but the classifier.
- ``xavier``: N(0, 2 / (fan_in + fan_out)) (Glorot & Bengio 2010, gain 1 whatever the
  activation: before a ReLU it halves E[a^2] per layer, the shrinkage He's gain undoes).
- ``normal``: N(0, 1), the course's "too large" example.
- ``small``: 0.01 * N(0, 1), the course's "small random numbers" (CS231n), too small for depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# gain^2 per activation that follows the layer (see module docstring)
_GAIN2 = {"relu": 2.0, "gelu": 2.0, "sigmoid": 1.0, "tanh": 1.0, "linear": 1.0}

INIT_SCHEMES = {
    "fan_in": "N(0, gain^2/fan_in): He (gain^2 2) before ReLU/GELU, LeCun (1) before sigmoid/tanh and logits",
    "xavier": "N(0, 2/(fan_in + fan_out)), Glorot & Bengio 2010",
    "normal": "N(0, 1)",
    "small": "0.01 * N(0, 1)",
}
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_init(scheme: str) -> str:
    """``scheme`` if known; else ValueError in one line listing the choices."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)} "
                         "(fan_in: He before ReLU, LeCun otherwise; normal: N(0,1); small: 0.01*N(0,1))")
    return scheme


def fan_in_std(fan_in: int, activation: str) -> float:
    """Standard deviation sqrt(gain^2 / fan_in) for weights followed by ``activation``."""
    if activation not in _GAIN2:
        raise ValueError(f"unknown activation {activation!r} for init; choose one of {sorted(_GAIN2)}")
    return math.sqrt(_GAIN2[activation] / fan_in)


def init_std(weight: torch.Tensor, scheme: str, activation: str = "linear") -> float:
    """The standard deviation ``scheme`` gives ``weight`` (out x in [x k x k]) before ``activation``."""
    fan_in = weight[0].numel()  # in_features, or in_channels/groups * kh * kw
    if check_init(scheme) == "fan_in":
        return fan_in_std(fan_in, activation)
    if scheme == "xavier":
        fan_out = weight.shape[0] * (weight[0][0].numel() if weight.ndim > 2 else 1)
        return math.sqrt(2.0 / (fan_in + fan_out))
    return 1.0 if scheme == "normal" else 0.01


@torch.no_grad()
def init_layer_(module: nn.Module, scheme: str = "fan_in", activation: str = "linear") -> None:
    """Initialise one ``nn.Linear`` / ``nn.Conv*``: N(0, init_std^2) weights, zero bias."""
    nn.init.normal_(module.weight, mean=0.0, std=init_std(module.weight, scheme, activation))
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_fan_in_(module: nn.Module, activation: str) -> None:
    """Initialise one ``nn.Linear`` / ``nn.Conv2d``: N(0, gain^2/fan_in) weights, zero bias."""
    init_layer_(module, "fan_in", activation)


@torch.no_grad()
def init_weights_(net: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every Linear/Conv of ``net`` with ``scheme`` (biases zero, norms untouched).

    The zoo's own families (``init_weights(scheme)``) know each layer's activation; any other
    network gets He's gain before every layer but its classifier (``get_classifier()``, else
    the last Linear), which gets LeCun's.
    """
    check_init(scheme)
    if hasattr(net, "init_weights"):
        net.init_weights(scheme)
        return net
    layers = [m for m in net.modules() if isinstance(m, _WEIGHTED)]
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, _WEIGHTED):
        head = next((m for m in reversed(layers) if isinstance(m, nn.Linear)), None)
    for m in layers:
        init_layer_(m, scheme, "linear" if m is head else "relu")
    return net


def build(builder, *, num_classes: int, arch_args: dict | None = None) -> nn.Module:
    """``builder(num_classes=..., **arch_args)`` with ``arch_args["init"]`` applied by
    :func:`init_weights_`, so every family takes ``init``, its own or not."""
    args = dict(arch_args or {})
    scheme = args.pop("init", None)
    if scheme is not None:
        check_init(scheme)  # before a large network is built
    net = builder(num_classes=num_classes, **args)
    return net if scheme is None else init_weights_(net, scheme)


@torch.no_grad()
def init_norm_(module: nn.Module) -> None:
    """BatchNorm / LayerNorm start as the identity map: gamma = 1, beta = 0."""
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class FcHead:
    """Mixin: ``get_classifier`` / ``reset_classifier`` for the zoo's own nets, whose logits come
    from ``self.fc`` over ``self.num_features`` features (timm's head API, which zoo.heads uses)."""

    fc: nn.Module
    num_features: int
    num_classes: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        ref = next(self.parameters(), None)  # type: ignore[attr-defined]
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_fan_in_(self.fc, "linear")  # logits: no activation follows (gain 1)
            if ref is not None:
                self.fc.to(device=ref.device, dtype=ref.dtype)
