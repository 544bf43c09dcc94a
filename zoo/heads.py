"""The classifier head of any zoo network: find it, name it, replace it.

Works for the zoo's own families (``fc``), torchvision models (``fc``, ``classifier.2``, ...)
and timm models (their ``get_classifier()``: ``head.fc``, ``fc``, ``classifier``, ...).
``ImageClassifier`` uses it for ``freeze_backbone`` (linear probe) and ``backbone_lr_scale``;
``zoo.weights`` uses it to drop a pretrained head whose class count differs.
"""

from __future__ import annotations

from torch import nn

# torchvision names its heads fc (ResNet, RegNet, GoogLeNet), classifier (ConvNeXt,
# EfficientNet, MobileNet, VGG, DenseNet) or heads (ViT); timm uses head / fc / classifier.
_HEAD_ATTRS = ("fc", "classifier", "head", "heads")


def _unwrap(net: nn.Module) -> nn.Module:
    # torch.compile's OptimizedModule and DDP keep the real network one level down
    while True:
        inner = getattr(net, "_orig_mod", None) or (
            net.module if isinstance(net, nn.parallel.DistributedDataParallel) else None
        )
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def _last_linear(module: nn.Module) -> nn.Module | None:
    found = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            found = m
    return found


def get_classifier(net: nn.Module) -> nn.Module:
    """The final layer producing the logits (an ``nn.Linear`` for every zoo family).

    timm models answer through their own ``get_classifier()`` (a few timm architectures
    have a 1x1 ``nn.Conv2d`` head; it is returned as is).
    """
    inner = _unwrap(net)
    if callable(getattr(inner, "get_classifier", None)):
        head = inner.get_classifier()
        if isinstance(head, (tuple, list)):  # distilled timm models: (head, head_dist)
            head = head[0]
        if isinstance(head, nn.Identity):
            raise ValueError(f"{type(inner).__name__} has no classifier (built with num_classes=0)")
        if isinstance(head, nn.Module):
            return head
    for attr in _HEAD_ATTRS:
        mod = getattr(inner, attr, None)
        if isinstance(mod, nn.Linear):
            return mod
        if isinstance(mod, nn.Module):
            last = _last_linear(mod)
            if last is not None:
                return last
    last = _last_linear(inner)
    if last is None:
        raise ValueError(
            f"cannot find a classifier layer in {type(inner).__name__}: it has no nn.Linear "
            "(was it built with num_classes=0?)"
        )
    return last


def classifier_prefix(net: nn.Module) -> str:
    """State-dict key prefix of the head, e.g. ``fc``, ``classifier.2``, ``head.fc``.

    Relative to ``net`` itself (a compiled net's prefix starts with ``_orig_mod.``, as its
    state_dict keys do).
    """
    head = get_classifier(net)
    for name, m in net.named_modules():
        if m is head:
            return name
    raise ValueError(f"the classifier of {type(net).__name__} is not one of its submodules")


def reset_classifier(net: nn.Module, num_classes: int) -> nn.Module:
    """Replace the head by a freshly initialised one with ``num_classes`` outputs; returns it.

    Keeps the head's device and dtype. timm models and the zoo's own families use their
    ``reset_classifier``; others get a new ``nn.Linear`` (PyTorch's default init) in place
    of the old one.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    inner = _unwrap(net)
    if callable(getattr(inner, "reset_classifier", None)):
        inner.reset_classifier(num_classes)
        return inner.get_classifier() if hasattr(inner, "get_classifier") else get_classifier(inner)
    old = get_classifier(inner)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"cannot reset a {type(old).__name__} head of {type(inner).__name__}")
    name = classifier_prefix(inner)
    ref = old.weight
    new: nn.Module
    if num_classes == 0:
        new = nn.Identity()
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        new.to(device=ref.device, dtype=ref.dtype)
    parent_name, _, child = name.rpartition(".")
    parent = inner.get_submodule(parent_name) if parent_name else inner
    setattr(parent, child, new)  # Sequential children are named "0", "1", ...: setattr works
    if hasattr(inner, "num_classes"):
        inner.num_classes = num_classes
    return new

