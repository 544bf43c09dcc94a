"""``mlp``: a fully connected network on flattened images, with the classic regularisers.

Each hidden layer: ``z = norm(W a + b)``, ``a' = dropout(act(z))`` (``+ a`` with skip
connections when the widths match), then a linear classifier ``fc``. Weights are
fan-in scaled for the activation (``zoo/init.py`` states the derivation); ``init`` picks
another scheme (xavier, normal, small).
Order as in timm: blocks, model, builder, registered entry points.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .init import FcHead, check_init, init_layer_, init_norm_
from .linear import _check_input
from .registry import DataConfig, register_model

Activation = Literal["sigmoid", "tanh", "relu", "gelu"]
Norm = Literal["none", "batchnorm", "layernorm"]

_ACTS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class DropConnectLinear(nn.Linear):
    """``nn.Linear`` that drops individual weights in training (Wan et al. 2013, DropConnect).

    Train: ``W * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per weight, one mask per forward
    (per mini-batch, not per example as in the paper: same expectation, far cheaper).
    The inverted scaling ``1 / (1 - p)`` makes ``E[W * m / (1 - p)] = W``, so the expected
    pre-activation in training equals the eval one and eval is the plain layer (identity).
    The bias is not dropped. State-dict keys are those of ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, p: float = 0.0, bias: bool = True) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropconnect p must be in [0, 1), got {p}")
        super().__init__(in_features, out_features, bias=bias)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight, self.bias)
        keep = torch.empty_like(self.weight).bernoulli_(1.0 - self.p)
        return F.linear(x, self.weight * keep / (1.0 - self.p), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class MLPBlock(nn.Module):
    """Linear (DropConnect) -> norm -> activation -> dropout, plus ``a_prev`` if ``skip``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: Activation,
        norm: Norm,
        dropout: float,
        dropconnect: float,
        skip: bool,
    ) -> None:
        super().__init__()
        self.fc = DropConnectLinear(in_features, out_features, p=dropconnect)
        if norm == "batchnorm":
            self.norm = nn.BatchNorm1d(out_features)
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(out_features)
        else:
            self.norm = nn.Identity()
        self.act = _ACTS[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = skip and in_features == out_features  # a = act(z) + a_prev only if shapes match

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.drop(self.act(self.norm(self.fc(x))))
        return a + x if self.skip else a


class MLP(FcHead, nn.Module):
    """``depth`` hidden layers of ``width`` units on ``in_chans x input_size x input_size`` images."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        depth: int = 2,
        width: int = 512,
        activation: Activation = "relu",
        norm: Norm = "none",
        dropout: float = 0.0,
        dropconnect: float = 0.0,
        skip: bool = False,
        input_size: int = 224,
        in_chans: int = 3,
        init: str = "fan_in",
    ) -> None:
        super().__init__()
        check_init(init)
        if activation not in _ACTS:
            raise ValueError(f"unknown mlp activation {activation!r}; choose one of {sorted(_ACTS)}")
        if norm not in ("none", "batchnorm", "layernorm"):
            raise ValueError(f"unknown mlp norm {norm!r}; choose 'none', 'batchnorm' or 'layernorm'")
        if depth < 0 or width < 1:
            raise ValueError(f"mlp needs depth >= 0 and width >= 1, got depth={depth}, width={width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp dropout must be in [0, 1), got {dropout}")
        self.input_shape = (in_chans, input_size, input_size)
        self.num_classes = num_classes
        self.activation = activation
        n_in = in_chans * input_size * input_size
        blocks = []
        for _ in range(depth):
            blocks.append(
                MLPBlock(
                    n_in, width, activation=activation, norm=norm, dropout=dropout,
                    dropconnect=dropconnect, skip=skip,
                )
            )
            n_in = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = n_in
        self.fc = nn.Linear(n_in, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(init)

    @torch.no_grad()
    def init_weights(self, scheme: str = "fan_in") -> None:
        """``scheme`` of zoo/init.py; fan_in: He before ReLU/GELU, LeCun before sigmoid and the logits."""
        for block in self.blocks:
            # fan_in: He et al. 2015 (ReLU/GELU), LeCun et al. 1998 (sigmoid, tanh)
            init_layer_(block.fc, scheme, self.activation)
            if not isinstance(block.norm, nn.Identity):
                init_norm_(block.norm)
        if isinstance(self.fc, nn.Linear):
            init_layer_(self.fc, scheme, "linear")  # logits: no activation follows

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_shape, "mlp")
        return self.blocks(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _create(**kwargs) -> MLP:
    return MLP(**kwargs)


@register_model(data_config=DataConfig(input_size=224), fixed_input=True)
def mlp(**kwargs) -> nn.Module:
    return _create(**kwargs)
