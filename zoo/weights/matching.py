"""Fitting a read source to a network: wrapper prefixes, the families' key layouts, the head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import heads, registry
from ..registry import DataConfig
from .sources import Source, Weights, WeightsError, read_weights

# Wrapper prefixes, stripped while every key has them and the model's keys do not.
_PREFIXES = ("module.", "_orig_mod.", "net.", "model.")


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    source: str
    format: str  # lightning | state_dict | safetensors | hf-folder | hf-hub | torchvision-hub | ...
    loaded: int = 0  # tensors copied into the model
    stripped: tuple[str, ...] = ()  # wrapper prefixes removed from the keys
    layout: Optional[str] = None  # key-layout conversion, e.g. "torchvision ConvNeXt -> timm"
    ema: bool = False  # EMA weights were used
    head_reset: Optional[tuple[Optional[int], int]] = None  # (classes in weights or None, model's)
    missing: list[str] = field(default_factory=list)  # strict=False only: missing or other shape
    unexpected: list[str] = field(default_factory=list)  # only with strict=False
    arch: Optional[str] = None  # architecture the weights say they belong to
    num_classes: Optional[int] = None
    arch_args: Optional[dict] = None
    data_config: Optional[DataConfig] = None  # preprocessing the weights were published with

    def __str__(self) -> str:
        notes = [self.format]
        if self.ema:
            notes.append("EMA weights")
        if self.layout:
            notes.append(f"{self.layout} layout")
        if self.stripped:
            notes.append("stripped " + "".join(self.stripped))
        s = f"{self.loaded} tensors from {self.source} ({', '.join(notes)})"
        if self.head_reset:
            src, dst = self.head_reset
            had = f"{src} classes" if src is not None else "no classifier"
            s += f"; head not loaded: weights have {had}, model {dst} (kept its new head)"
        if self.missing or self.unexpected:
            s += f"; {len(self.missing)} missing, {len(self.unexpected)} unexpected keys ignored"
        return s


def _strip_prefixes(sd: dict[str, torch.Tensor], target: Mapping) -> tuple[dict, tuple[str, ...]]:
    stripped: list[str] = []
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd) and not all(k.startswith(p) for k in target):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    return sd, tuple(stripped)


def _fits(v: torch.Tensor, t: torch.Tensor) -> bool:
    return v.shape == t.shape or (v.numel() == t.numel() and v.squeeze().shape == t.squeeze().shape)


def _match_layout(sd: dict[str, torch.Tensor], net: nn.Module) -> tuple[dict, Optional[str]]:
    """The key layout of ``sd`` that fits ``net`` best (most keys with fitting shapes).

    Candidates: the keys as they are, then every key layout the families registered
    (``registry.register_key_layout``, e.g. ``zoo.convnext``) that says it applies.
    """
    target = net.state_dict()

    def score(d: Mapping[str, torch.Tensor]) -> int:
        return sum(1 for k, v in d.items() if k in target and _fits(v, target[k]))

    best, best_name, best_score = sd, None, score(sd)
    if best_score == len(target) == len(sd):
        return sd, None
    keys = list(sd)
    for layout in registry.key_layouts():
        if not layout.applies(keys):
            continue
        try:
            cand = layout.convert(dict(sd), net)
        except (KeyError, RuntimeError, ValueError):  # a filter written for another network
            continue
        s = score(cand)
        if s > best_score:
            best, best_name, best_score = cand, layout.name, s
    # reshape what only differs by singleton dims (layer scale: (C,) vs torchvision's (C, 1, 1))
    best = {
        k: (v.reshape(target[k].shape) if k in target and v.shape != target[k].shape and _fits(v, target[k]) else v)
        for k, v in best.items()
    }
    return best, best_name


def _prepare(w: Weights, net: nn.Module) -> tuple[dict, tuple[str, ...], Optional[str]]:
    target = net.state_dict()
    sd, stripped = _strip_prefixes(dict(w.state_dict), target)
    sd, layout = _match_layout(sd, net)
    return sd, stripped, layout


def head_classes(weights: Source, net: nn.Module) -> Optional[int]:
    """Class count of the classifier in ``weights`` once their keys are fitted to ``net`` (its
    layout and wrapper prefixes), None when ``net`` has no classifier or the weights none for it.

    ``net`` only gives the key names and shapes: a network built on the meta device will do.
    """
    w = read_weights(weights)
    try:
        prefix = heads.classifier_prefix(net)
        sd, _, _ = _prepare(w, net)
    except Exception:  # a network without a classifier layer, or keys no layout fits
        return None
    v = sd.get(prefix + ".weight")
    return int(v.shape[0]) if v is not None else None


# --------------------------------------------------------------------------- loading


def _target_net(net: nn.Module) -> nn.Module:
    # an ImageClassifier (LightningModule) -> its network; compiled / DDP -> the inner module
    inner = getattr(net, "net", None)
    if isinstance(inner, nn.Module) and hasattr(net, "hparams"):
        net = inner
    return heads._unwrap(net)


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_weights(
    net: nn.Module,
    source: Source,
    *,
    arch: Optional[str] = None,
    strict: bool = True,
    use_ema: bool = True,
) -> LoadReport:
    """Copy the weights of ``source`` into ``net`` (in place) and report what happened.

    Args:
        net: the bare network (an ImageClassifier is accepted too: its ``.net`` is used).
        source: a file (``.ckpt``, ``.pth``, ``.pt``, ``.bin``, ``.safetensors``), a Hugging
            Face snapshot folder, a hub id (``hf-hub:...``, ``torchvision:...``) or a state_dict.
        arch: the registry name of ``net``, for messages.
        strict: raise :class:`WeightsError` unless every key fits (the classifier excepted
            when its class count differs); ``False`` loads what fits and lists the rest.
        use_ema: prefer EMA weights when the checkpoint holds them.
    """
    w = read_weights(source, use_ema)
    net = _target_net(net)
    what = arch or type(net).__name__
    sd, stripped, layout = _prepare(w, net)
    target = net.state_dict()

    # The classifier: another class count (or none at all in the weights) is not an error.
    head_reset = None
    try:
        prefix = heads.classifier_prefix(net) + "."
    except (ValueError, TypeError):
        prefix = None
    if prefix is not None:
        head_t = {k: v for k, v in target.items() if k.startswith(prefix)}
        head_s = {k: v for k, v in sd.items() if k.startswith(prefix)}
        wkey = prefix + "weight"
        if not head_s:
            head_reset = (None, int(target[wkey].shape[0])) if wkey in target else None
        elif wkey in head_s and wkey in target and head_s[wkey].shape[0] != target[wkey].shape[0]:
            head_reset = (int(head_s[wkey].shape[0]), int(target[wkey].shape[0]))
        if head_reset is not None:
            sd = {k: v for k, v in sd.items() if k not in head_s}
            target = {k: v for k, v in target.items() if k not in head_t}

    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    wrong = [k for k in sd if k in target and not _fits(sd[k], target[k])]
    if strict and (missing or unexpected or wrong):
        raise WeightsError(_mismatch_message(w, what, missing, unexpected, wrong, sd, target))
    fitting = {k: v for k, v in sd.items() if k in target and k not in wrong}
    net.load_state_dict(fitting, strict=False)
    return LoadReport(
        source=w.name, format=w.format, loaded=len(fitting), stripped=stripped, layout=layout, ema=w.ema,
        head_reset=head_reset, missing=missing + wrong if not strict else [],
        unexpected=unexpected if not strict else [], arch=w.arch, num_classes=w.num_classes,
        arch_args=w.arch_args, data_config=w.data_config,
    )


def _mismatch_message(w: Weights, what: str, missing, unexpected, wrong, sd, target) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected")
    head = " and ".join(parts) + " keys" if parts else ""
    if wrong:
        head += (", " if head else "") + f"{len(wrong)} with another shape"
    eg = []
    if missing:
        eg.append(f"missing {_examples(missing)}")
    if unexpected:
        eg.append(f"unexpected {_examples(unexpected)}")
    if wrong:
        k = wrong[0]
        eg.append(f"{k}: {tuple(sd[k].shape)} in the weights vs {tuple(target[k].shape)} in the model")
    saved_from = f" (they say {w.arch})" if w.arch and w.arch != what else ""
    many = len(missing) + len(unexpected) + len(wrong) > max(4, len(target) // 4)
    hint = (
        f"was it saved from another architecture{saved_from}?"
        if many or saved_from
        else "were they saved with other arch_args, or pass strict=False to load what fits"
    )
    lines = [f"weights {w.name} do not fit {what}: {head}, e.g. {'; '.join(eg)} -- {hint}"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_examples(missing, 8)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_examples(unexpected, 8)}")
    for k in wrong[:8]:
        lines.append(f"  shape {k}: weights {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}")
    return "\n".join(lines)


