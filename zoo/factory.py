"""``zoo.create`` and ``zoo.load``: a model from a registry name and/or weights.

The one layer above both the model (``zoo.base``) and state-dict I/O (``zoo.weights``, which
imports nothing of the model), as timm's ``_factory.py`` sits above its models and
``_hub.py``/``_manipulate.py``. Both entry points read the weights once (:func:`zoo.weights.read_weights`),
take the class count from them (:func:`weights_num_classes`) and build the model in :func:`_build`.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import init, registry
from .weights import Source, Weights, WeightsError, head_classes, read_weights


def weights_num_classes(weights: Source | Weights, name: Optional[str] = None,
                        arch_args: Optional[dict] = None) -> Optional[int]:
    """Classes of ``weights``: what they record, else the rows of their classifier once fitted to
    architecture ``name`` (built on the meta device, no memory); None when neither tells."""
    w = read_weights(weights)
    if w.num_classes:
        return int(w.num_classes)
    if not name:
        return None
    try:
        with torch.device("meta"):
            net = init.build(registry.get_entry(name).builder, num_classes=1000, arch_args=arch_args or {})
    except Exception:  # an architecture that cannot be built on meta: fall back to defaults
        return None
    return head_classes(w, net)


def _build(name: str, w: Optional[Weights], *, num_classes: Optional[int], record: bool, strict: bool = True,
           **init_kw):
    """The ImageClassifier ``name`` with ``w`` loaded (:meth:`~zoo.base.ImageClassifier.load_pretrained`).

    ``num_classes=None``: as many as the weights have, 1000 when they do not tell. ``record``:
    the model keeps the weights' name as its ``weights`` hyper-parameter, as
    ``ImageClassifier(weights=...)`` does (``zoo.create``); else the hyper-parameter stays None (``zoo.load``).
    """
    from .base import ImageClassifier

    if num_classes is None and w is not None:
        num_classes = weights_num_classes(w, name, init_kw.get("arch_args"))
    num_classes = num_classes or 1000
    if record:
        return ImageClassifier(arch=name, num_classes=num_classes, weights=w, **init_kw)
    model = ImageClassifier(arch=name, num_classes=num_classes, weights=None, **init_kw)
    if w is not None:
        model.load_pretrained(w, strict=strict)
    return model


def create(name: str, *, num_classes: int | None = None, weights=None, **kwargs):
    """Build an :class:`~zoo.base.ImageClassifier` (a LightningModule) for ``name``.

    ``kwargs`` are ImageClassifier arguments (optimizer, lr, use_ema, ...); architecture
    arguments go in ``arch_args={...}``. With ``weights``, the network and its preprocessing
    come from them, exactly as :func:`load` with the same ``num_classes`` gives.
    ``num_classes``: ``None`` means as many as the weights have (as :func:`load`), else 1000.
    """
    w = read_weights(weights, kwargs.get("use_ema", True)) if weights is not None else None
    return _build(name, w, num_classes=num_classes, record=True, **kwargs)


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
    model's ``data_config``. The :class:`~zoo.weights.LoadReport` is kept as ``model.weights_report``.
    """
    from .base import ImageClassifier

    w = read_weights(weights, use_ema) if weights is not None else None
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
    return _build(name, w, num_classes=num_classes, record=False, strict=strict, arch_args=arch_args or None,
                  use_ema=use_ema, **init_kw)
