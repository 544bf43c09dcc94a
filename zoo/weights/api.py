"""``zoo.load``: build an ImageClassifier from a name and/or weights."""

from __future__ import annotations

from typing import Optional

import torch

from .. import heads, init, registry
from .matching import _prepare
from .sources import Source, WeightsError, _read, _Weights


def _infer_num_classes(name: str, arch_args: dict, w: _Weights) -> Optional[int]:
    """Class count of the weights' head, found by building the model on the meta device."""
    try:
        with torch.device("meta"):
            net = init.build(registry.get_entry(name).builder, num_classes=1000, arch_args=arch_args)
        prefix = heads.classifier_prefix(net)
        sd, _, _ = _prepare(w, net)
    except Exception:  # an architecture that cannot be built on meta: fall back to defaults
        return None
    v = sd.get(prefix + ".weight")
    return int(v.shape[0]) if v is not None else None


def load(
    name: Optional[str] = None,
    weights: Optional[Source] = None,
    *,
    num_classes: Optional[int] = None,
    use_ema: bool = True,
    strict: bool = True,
    **kwargs,
):
    """Build an :class:`~zoo.base.ImageClassifier` and load ``weights`` into its network.

    ``zoo.load("resnet50", weights="torchvision:ResNet50_Weights.IMAGENET1K_V2")``,
    ``zoo.load(weights="runs/x/last.ckpt")`` (architecture, classes and training
    hyper-parameters from the checkpoint), ``zoo.load("convnext_tiny", weights=..., num_classes=10)``
    (head reset for fine-tuning).

    Args:
        name: registry name; ``None`` takes it from the weights (Lightning checkpoint,
            safetensors metadata, snapshot config.json).
        num_classes: classes of the model; ``None``: as many as the weights have (1000 when
            they say nothing). A different number leaves the new head unloaded.
        kwargs: ImageClassifier arguments (``arch_args={...}``, ``lr``, ...); with a
            Lightning checkpoint of the same architecture they override its hyper-parameters.
    The weights go in through :meth:`ImageClassifier.load_pretrained`, the path of
    ``ImageClassifier(weights=...)``: same tensors, and the preprocessing that travels with
    the weights (safetensors metadata, config.json, a checkpoint's data config) as the
    model's ``data_config``. The :class:`LoadReport` is kept as ``model.weights_report``.
    """
    import inspect

    from ..base import ImageClassifier

    w = _read(weights, use_ema) if weights is not None else None
    if name is None:
        if w is None:
            raise WeightsError("zoo.load needs a model name or weights to take it from")
        if not w.arch:
            raise WeightsError(
                f"cannot tell which architecture {w.name} belongs to; pass the name, "
                f"e.g. zoo.load('resnet50', weights={w.name!r})"
            )
        name = w.arch
    registry.get_entry(name)  # UnknownModelError (with close names) before any work
    same = w is not None and w.arch == name
    arch_args = dict((w.arch_args or {}) if same else {})
    arch_args.update(kwargs.pop("arch_args", None) or {})
    init_kw: dict = {}
    if same and w.hparams:
        accepted = inspect.signature(ImageClassifier.__init__).parameters
        skip = {"self", "arch", "num_classes", "arch_args", "weights", "use_ema"}
        init_kw = {k: v for k, v in w.hparams.items() if k in accepted and k not in skip}
    init_kw.update(kwargs)
    if num_classes is None and w is not None:
        num_classes = w.num_classes or _infer_num_classes(name, arch_args, w)
    model = ImageClassifier(
        arch=name, num_classes=num_classes or 1000, arch_args=arch_args or None, weights=None,
        use_ema=use_ema, **init_kw
    )
    if w is not None:
        model.load_pretrained(w, strict=strict)
    return model


