"""Fan-in-scaled weight initialisation for the zoo's own families (logreg, mlp, convnet).

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
"""

from __future__ import annotations

import math

import torch
from torch import nn

# gain^2 per activation that follows the layer (see module docstring)
_GAIN2 = {"relu": 2.0, "gelu": 2.0, "sigmoid": 1.0, "linear": 1.0}


def fan_in_std(fan_in: int, activation: str) -> float:
    """Standard deviation sqrt(gain^2 / fan_in) for weights followed by ``activation``."""
    if activation not in _GAIN2:
        raise ValueError(f"unknown activation {activation!r} for init; choose one of {sorted(_GAIN2)}")
    return math.sqrt(_GAIN2[activation] / fan_in)


@torch.no_grad()
def init_fan_in_(module: nn.Module, activation: str) -> None:
    """Initialise one ``nn.Linear`` / ``nn.Conv2d``: N(0, gain^2/fan_in) weights, zero bias."""
    w = module.weight
    fan_in = w[0].numel()  # in_features, or in_channels/groups * kh * kw
    nn.init.normal_(w, mean=0.0, std=fan_in_std(fan_in, activation))
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


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
