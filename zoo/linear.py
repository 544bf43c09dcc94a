"""``logreg``: multinomial logistic regression, the "linear neural network".

flatten(image) -> Linear -> logits. The softmax lives in the loss (``F.cross_entropy``), as
everywhere in the zoo. Order as in timm: model, builder, registered entry points.
"""

from __future__ import annotations

import torch
from torch import nn

from .init import FcHead, check_init, init_layer_
from .registry import DataConfig, register_model


class LogisticRegression(FcHead, nn.Module):
    """Logits = W vec(x) + b for images of a fixed size ``in_chans x input_size x input_size``."""

    def __init__(self, *, num_classes: int = 1000, input_size: int = 224, in_chans: int = 3, init: str = "fan_in") -> None:
        super().__init__()
        check_init(init)
        if input_size < 1 or in_chans < 1:
            raise ValueError(f"logreg needs input_size >= 1 and in_chans >= 1, got {input_size}, {in_chans}")
        self.input_shape = (in_chans, input_size, input_size)
        self.num_classes = num_classes
        self.num_features = in_chans * input_size * input_size
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(init)

    @torch.no_grad()
    def init_weights(self, scheme: str = "fan_in") -> None:
        """``scheme`` of zoo/init.py; fan_in: no activation after the logits, gain 1 (LeCun)."""
        if isinstance(self.fc, nn.Linear):
            init_layer_(self.fc, scheme, "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_shape, "logreg")
        return self.fc(torch.flatten(x, 1))


def _check_input(x: torch.Tensor, expected: tuple[int, int, int], arch: str) -> None:
    # flatten -> Linear only works at the size it was built for; say so instead of a matmul error
    if tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{arch} was built for inputs of shape {expected}, got {tuple(x.shape[1:])}; "
            f"build it with arch_args={{'input_size': {x.shape[-1]}}} or resize the images"
        )


def _create(**kwargs) -> LogisticRegression:
    return LogisticRegression(**kwargs)


# 224x224x3 like every ImageNet entry; pass input_size for small images (and a matching
# DataConfig in the data module).
@register_model(data_config=DataConfig(input_size=224), fixed_input=True)
def logreg(**kwargs) -> nn.Module:
    return _create(**kwargs)
