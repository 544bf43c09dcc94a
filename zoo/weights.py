"""Loading weights into zoo networks, from wherever they were published or trained.

One entry for users, :func:`load` (``zoo.load``), and one for code, :func:`load_weights`.
Sources:

- this project's Lightning ``.ckpt`` (``state_dict`` under ``net.``; the ``WeightEMA``
  callback's EMA weights are used when present and ``use_ema=True``); its
  ``hyper_parameters`` rebuild the model (``zoo.load(weights="last.ckpt")``);
- plain ``state_dict`` files (torchvision, timm, ``torch.save(net.state_dict())``), timm
  training checkpoints (``state_dict`` / ``state_dict_ema``), facebookresearch/ConvNeXt
  ``.pth`` files (``{"model": ...}``);
- ``.safetensors`` files (the metadata written by :func:`export_safetensors` rebuilds the
  model) and Hugging Face snapshot folders (``model.safetensors`` or ``pytorch_model.bin``
  plus ``config.json``, as timm's ``push_to_hub`` writes them);
- hub ids: ``hf-hub:timm/convnext_tiny.fb_in1k`` (``@revision`` allowed) and
  ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` (downloaded once into the usual caches).

Keys are matched after removing wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``, ``net.``/``model.`` from LightningModules) and, for ConvNeXt, after
converting between torchvision's, timm's and the official layout. A head with another class
count is not loaded (the model keeps its freshly built head) and the report says so; any
other mismatch raises :class:`WeightsError`. Files are read with
``torch.load(..., map_location="cpu", weights_only=True)``: a file that needs to run code
to unpickle is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import heads, registry
from .registry import DataConfig

Source = Union[str, os.PathLike, Mapping]

# Wrapper prefixes, stripped while every key has them and the model's keys do not.
_PREFIXES = ("module.", "_orig_mod.", "net.", "model.")
# Hugging Face snapshot folder files, in order of preference (safetensors first: no pickle).
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the first line says why."""


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


@dataclass
class _Weights:
    """A source read into memory: tensors plus what it says about itself."""

    name: str
    state_dict: dict[str, torch.Tensor]
    format: str
    ema: bool = False
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    arch_args: Optional[dict] = None
    data_config: Optional[DataConfig] = None
    hparams: dict = field(default_factory=dict)  # Lightning hyper_parameters


# --------------------------------------------------------------------------- reading


def _torch_load(path: pathlib.Path) -> Any:
    # Plain-data classes that training scripts put next to the tensors: paths in
    # hyper-parameters (data roots), argparse.Namespace in timm's train.py and the
    # facebookresearch main.py checkpoints ("args"). Building them runs no user code.
    safe = [
        pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
        argparse.Namespace,
    ]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m:
            raise WeightsError(
                f"{path} contains pickled Python objects ({m.group(1)}), not only tensors, and is "
                "refused (unpickling it could run code); re-save it with "
                "torch.save(model.state_dict()) or convert it to safetensors"
            ) from None
        raise WeightsError(f"{path} is not a readable PyTorch or safetensors weights file") from None
    except Exception as e:  # zip/pickle parse errors of all kinds: not a torch.save file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{path} is not a readable PyTorch weights file ({first})") from None


def _read_safetensors(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors, meta


def _json_or_none(s: Optional[str]) -> Any:
    if s is None:
        return None
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


def _data_config_from_dict(d: Optional[Mapping]) -> Optional[DataConfig]:
    if not d:
        return None
    from .timm_model import data_config_from_timm

    if isinstance(d.get("input_size"), int):  # ours: square size
        d = dict(d, input_size=(3, d["input_size"], d["input_size"]))
    return data_config_from_timm(dict(d))


def _tensors_only(sd: Mapping) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_container(obj: Any, name: str, use_ema: bool) -> _Weights:
    """Find the model's tensors in whatever dict a training script saved."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{name} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    # this project's Lightning checkpoint
    if isinstance(obj.get("state_dict"), Mapping) and (
        "pytorch-lightning_version" in obj or "hyper_parameters" in obj or "callbacks" in obj
    ):
        sd = _tensors_only(obj["state_dict"])
        if any(k.startswith("net.") for k in sd):  # ImageClassifier keeps the network as self.net
            sd = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
        hp = dict(obj.get("hyper_parameters") or {})
        w = _Weights(
            name, sd, "lightning", arch=hp.get("arch"), num_classes=hp.get("num_classes"),
            arch_args=hp.get("arch_args"), hparams=hp,
        )
        ema = None
        for key, state in (obj.get("callbacks") or {}).items():
            if "WeightEMA" in str(key) and isinstance(state, Mapping) and state.get("ema_state_dict"):
                ema = _tensors_only(state["ema_state_dict"])
        if ema and use_ema:
            # EMA covers parameters and float buffers; integer buffers (num_batches_tracked)
            # come from the state_dict.
            ema = {k[4:] if k.startswith("net.") else k: v for k, v in ema.items()}
            w.state_dict = {**sd, **ema}
            w.ema = True
        return w
    # timm train.py checkpoint
    if isinstance(obj.get("state_dict"), Mapping):
        if use_ema and _is_state_dict(obj.get("state_dict_ema")):
            return _Weights(name, _tensors_only(obj["state_dict_ema"]), "checkpoint", ema=True)
        return _Weights(name, _tensors_only(obj["state_dict"]), "checkpoint")
    # facebookresearch (ConvNeXt, DeiT, MAE ...) main.py checkpoints: {"model": ..., "model_ema": ...}
    if isinstance(obj.get("model"), Mapping):
        if use_ema and _is_state_dict(obj.get("model_ema")):
            return _Weights(name, _tensors_only(obj["model_ema"]), "checkpoint", ema=True)
        return _Weights(name, _tensors_only(obj["model"]), "checkpoint")
    sd = _tensors_only(obj)
    if not sd:
        raise WeightsError(f"{name} holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    return _Weights(name, sd, "state_dict")


def _read_file(path: pathlib.Path, name: str, use_ema: bool) -> _Weights:
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        nc = meta.get("num_classes")
        return _Weights(
            name, tensors, "safetensors", arch=meta.get("arch") or None,
            num_classes=int(nc) if nc and nc.isdigit() else None,
            arch_args=_json_or_none(meta.get("arch_args")),
            data_config=_data_config_from_dict(_json_or_none(meta.get("data_config"))),
        )
    return _from_container(_torch_load(path), name, use_ema)


def _read_folder(folder: pathlib.Path, name: str, use_ema: bool, fmt: str = "hf-folder") -> _Weights:
    """A Hugging Face snapshot: model.safetensors | pytorch_model.bin (or sharded) + config.json."""
    files = [folder / f for f in _HF_WEIGHT_FILES if (folder / f).is_file()]
    for index in _HF_INDEX_FILES:
        if not files and (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
    if not files:
        raise WeightsError(
            f"folder {folder} holds no weights: expected {' or '.join(_HF_WEIGHT_FILES)} (a Hugging Face snapshot)"
        )
    if len(files) == 1:
        w = _read_file(files[0], name, use_ema)
    else:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(_read_file(f, name, use_ema).state_dict)
        w = _Weights(name, sd, fmt)
    w.format = fmt
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        zoo_cfg = cfg.get("zoo") or {}
        if zoo_cfg.get("arch"):
            w.arch = zoo_cfg["arch"]
            w.arch_args = zoo_cfg.get("arch_args") or w.arch_args
        elif cfg.get("architecture") and not w.arch:  # timm's push_to_hub config
            w.arch = registry.TIMM_PREFIX + cfg["architecture"]
        if isinstance(cfg.get("num_classes"), int):
            w.num_classes = cfg["num_classes"]
        dc = _data_config_from_dict(cfg.get("pretrained_cfg"))
        w.data_config = dc or w.data_config
    return w


def _read_hf_hub(spec: str, use_ema: bool) -> _Weights:
    import huggingface_hub as hfh
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    repo, _, revision = spec[len("hf-hub:"):].partition("@")

    def fetch(fname: str) -> Optional[str]:
        try:
            return hfh.hf_hub_download(repo, fname, revision=revision or None)
        except hf_errors.LocalEntryNotFoundError:
            raise  # offline and not cached: handled below
        except hf_errors.EntryNotFoundError:
            return None  # the repository has no such file

    try:
        fetch("config.json")
        files = (fetch(f) for f in _HF_WEIGHT_FILES)
        found = next((f for f in files if f is not None), None)
    except hf_errors.RepositoryNotFoundError:
        raise WeightsError(f"{spec}: no such repository on the Hugging Face hub (or it is gated/private)") from None
    except hf_errors.RevisionNotFoundError:
        raise WeightsError(f"{spec}: the repository has no revision {revision!r}") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError) as e:
        why = "offline mode, HF_HUB_OFFLINE=1" if constants.is_offline_mode() else "hub unreachable"
        raise WeightsError(
            f"cannot fetch {spec} from the Hugging Face hub ({why}: {type(e).__name__}); "
            f"download it where the hub is reachable (`hf download {repo} --local-dir DIR`) "
            "and pass weights=DIR"
        ) from None
    if found is None:
        raise WeightsError(f"{spec}: the repository has no {' or '.join(_HF_WEIGHT_FILES)}")
    # hf_hub_download puts every file of one revision in the same snapshot folder
    return _read_folder(pathlib.Path(found).parent, spec, use_ema, fmt="hf-hub")


def _torchvision_builder_name(weights_enum) -> Optional[str]:
    import torchvision.models as tvm

    for name in tvm.list_models(module=tvm):
        try:
            if tvm.get_model_weights(name) is type(weights_enum):
                return name
        except (ValueError, KeyError):
            continue
    return None


def _read_torchvision_hub(spec: str) -> _Weights:
    import urllib.error

    import torchvision.models as tvm

    enum_name = spec[len("torchvision:"):]
    try:
        w = tvm.get_weight(enum_name)
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(
            f"{spec}: torchvision has no such weights; use 'torchvision:<Model>_Weights.<NAME>', "
            "e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2"
        ) from None
    t = w.transforms()  # ImageClassification: crop_size, resize_size, interpolation, mean, std
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0]) if t.resize_size else crop
    data_config = DataConfig(
        input_size=crop, crop_pct=crop / resize, mean=tuple(t.mean), std=tuple(t.std),
        interpolation=t.interpolation.value,
    )
    try:
        sd = torch.hub.load_state_dict_from_url(
            w.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or type(e).__name__
        cache = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        raise WeightsError(
            f"cannot download {spec} from {w.url} ({why}); fetch the file where the network is "
            f"reachable and put it at {cache}, or pass its path as weights="
        ) from None
    return _Weights(
        spec, _tensors_only(sd), "torchvision-hub", arch=_torchvision_builder_name(w),
        num_classes=len(w.meta.get("categories") or []) or None, data_config=data_config,
    )


def _read(source: Any, use_ema: bool = True) -> _Weights:
    """Read any supported source into memory (once; load() and load_weights() share it)."""
    if isinstance(source, _Weights):
        return source
    if isinstance(source, Mapping):
        return _from_container(source, "the given state_dict", use_ema)
    if not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"weights must be a path, a hub id or a state_dict, not {type(source).__name__}")
    spec = os.fspath(source)
    if spec.startswith("hf-hub:"):
        return _read_hf_hub(spec, use_ema)
    if spec.startswith("torchvision:"):
        return _read_torchvision_hub(spec)
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path, spec, use_ema)
    if not path.is_file():
        hint = (
            " (hub ids look like hf-hub:timm/convnext_tiny.fb_in1k or "
            "torchvision:ResNet50_Weights.IMAGENET1K_V2)"
            if ":" in spec and not path.parent.exists()
            else ""
        )
        raise WeightsError(f"weights file {spec} not found{hint}")
    return _read_file(path, spec, use_ema)


# --------------------------------------------------------------------------- key layouts

_TV_BLOCK = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}
_TIMM_BLOCK = {v: k for k, v in _TV_BLOCK.items()}


def _map_keys(sd: Mapping[str, torch.Tensor], fn: Callable[[str], str]) -> dict[str, torch.Tensor]:
    return {fn(k): v for k, v in sd.items()}


def _convnext_tv_to_timm(k: str) -> str:
    """torchvision ConvNeXt (features.*, classifier.*) -> timm (stem, stages, head)."""
    m = re.match(r"features\.(\d+)\.(.*)$", k)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:
            return f"stem.{rest}"
        if i % 2 == 0:  # features[2s]: LayerNorm2d + 2x2 conv downsampling into stage s
            return f"stages.{i // 2}.downsample.{rest}"
        s = (i - 1) // 2
        b = re.match(r"(\d+)\.layer_scale$", rest)
        if b:
            return f"stages.{s}.blocks.{b.group(1)}.gamma"
        b = re.match(r"(\d+)\.block\.(\d+)\.(.*)$", rest)
        if b and b.group(2) in _TV_BLOCK:
            return f"stages.{s}.blocks.{b.group(1)}.{_TV_BLOCK[b.group(2)]}.{b.group(3)}"
        return k
    k = re.sub(r"^classifier\.0\.", "head.norm.", k)
    return re.sub(r"^classifier\.2\.", "head.fc.", k)


def _convnext_timm_to_tv(k: str) -> str:
    """timm ConvNeXt -> torchvision (inverse of :func:`_convnext_tv_to_timm`)."""
    m = re.match(r"stem\.(.*)$", k)
    if m:
        return f"features.0.{m.group(1)}"
    m = re.match(r"stages\.(\d+)\.downsample\.(.*)$", k)
    if m:
        return f"features.{2 * int(m.group(1))}.{m.group(2)}"
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k)
    if m:
        s, j, rest = int(m.group(1)), m.group(2), m.group(3)
        if rest == "gamma":
            return f"features.{2 * s + 1}.{j}.layer_scale"
        for timm_name, tv_idx in _TIMM_BLOCK.items():
            if rest.startswith(timm_name + "."):
                return f"features.{2 * s + 1}.{j}.block.{tv_idx}.{rest[len(timm_name) + 1:]}"
        return k
    k = re.sub(r"^head\.norm\.", "classifier.0.", k)
    return re.sub(r"^head\.fc\.", "classifier.2.", k)


def _convnext_fb_to_timm(k: str) -> str:
    """facebookresearch/ConvNeXt -> timm (as timm.models.convnext.checkpoint_filter_fn)."""
    k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
    k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
    k = k.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")  # ConvNeXt-V2
    k = re.sub(r"^head\.", "head.fc.", k)
    return re.sub(r"^norm\.", "head.norm.", k)


# (name, applies to these keys?, key map); tried only when the keys do not match as they are
_LAYOUTS: list[tuple[str, Callable[[list[str]], bool], Callable[[str], str]]] = [
    (
        "official ConvNeXt -> timm",
        lambda ks: any(k.startswith("downsample_layers.") for k in ks),
        _convnext_fb_to_timm,
    ),
    (
        "torchvision ConvNeXt -> timm",
        lambda ks: any(re.match(r"features\.\d+\.\d+\.block\.", k) for k in ks),
        _convnext_tv_to_timm,
    ),
    (
        "timm ConvNeXt -> torchvision",
        lambda ks: any(re.match(r"stages\.\d+\.blocks\.\d+\.conv_dw\.", k) for k in ks),
        _convnext_timm_to_tv,
    ),
    (
        "official ConvNeXt -> torchvision",
        lambda ks: any(k.startswith("downsample_layers.") for k in ks),
        lambda k: _convnext_timm_to_tv(_convnext_fb_to_timm(k)),
    ),
]


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


def _match_layout(sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> tuple[dict, Optional[str]]:
    """The key layout of ``sd`` that fits ``target`` best (most keys with fitting shapes)."""

    def score(d: Mapping[str, torch.Tensor]) -> int:
        return sum(1 for k, v in d.items() if k in target and _fits(v, target[k]))

    best, best_name, best_score = sd, None, score(sd)
    if best_score == len(target) == len(sd):
        return sd, None
    keys = list(sd)
    for name, applies, fn in _LAYOUTS:
        if applies(keys):
            cand = _map_keys(sd, fn)
            s = score(cand)
            if s > best_score:
                best, best_name, best_score = cand, name, s
    # reshape what only differs by singleton dims (layer scale: (C,) vs torchvision's (C, 1, 1))
    best = {
        k: (v.reshape(target[k].shape) if k in target and v.shape != target[k].shape and _fits(v, target[k]) else v)
        for k, v in best.items()
    }
    return best, best_name


def _prepare(w: _Weights, net: nn.Module) -> tuple[dict, tuple[str, ...], Optional[str]]:
    target = net.state_dict()
    sd, stripped = _strip_prefixes(dict(w.state_dict), target)
    sd, layout = _match_layout(sd, target)
    return sd, stripped, layout


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
    w = _read(source, use_ema)
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


def _mismatch_message(w: _Weights, what: str, missing, unexpected, wrong, sd, target) -> str:
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


def _infer_num_classes(name: str, arch_args: dict, w: _Weights) -> Optional[int]:
    """Class count of the weights' head, found by building the model on the meta device."""
    try:
        with torch.device("meta"):
            net = registry.create_network(name, num_classes=1000, **arch_args)
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
    The :class:`LoadReport` is kept as ``model.weights_report``.
    """
    import inspect

    from .base import ImageClassifier

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
        skip = {"self", "arch", "num_classes", "arch_args", "weights"}
        init_kw = {k: v for k, v in w.hparams.items() if k in accepted and k not in skip}
    init_kw.update(kwargs)
    if num_classes is None and w is not None:
        num_classes = w.num_classes or _infer_num_classes(name, arch_args, w)
    model = ImageClassifier(
        arch=name, num_classes=num_classes or 1000, arch_args=arch_args or None, weights=None, **init_kw
    )
    model.weights_report = None
    if w is not None:
        model.weights_report = load_weights(model.net, w, arch=name, strict=strict, use_ema=use_ema)
    return model


# --------------------------------------------------------------------------- export


def export_safetensors(
    model_or_net: nn.Module,
    path: Union[str, os.PathLike],
    *,
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    arch_args: Optional[dict] = None,
    data_config: Union[DataConfig, Mapping, None] = None,
) -> pathlib.Path:
    """Write the network's weights as safetensors, with what rebuilds the model in the header.

    ``path`` ending in ``.safetensors``: one file; metadata ``arch``, ``num_classes``,
    ``arch_args`` (JSON) and ``data_config`` (JSON). Any other ``path``: a Hugging Face
    snapshot folder (``model.safetensors`` + ``config.json`` in timm's format, plus a ``zoo``
    section), ready for ``hf upload``. An ImageClassifier supplies arch, classes, arch_args
    and data config itself; a bare network needs ``arch`` for ``zoo.load(weights=...)`` to
    rebuild it. Written atomically (temporary file, then rename).
    """
    from safetensors.torch import save_file

    net = model_or_net
    hp = getattr(model_or_net, "hparams", None)
    if isinstance(getattr(model_or_net, "net", None), nn.Module) and hp is not None:
        net = model_or_net.net
        arch = arch or hp.get("arch")
        arch_args = arch_args if arch_args is not None else hp.get("arch_args")
        data_config = data_config or getattr(model_or_net, "data_config", None)
    net = heads._unwrap(net)
    if num_classes is None:
        try:
            num_classes = int(heads.get_classifier(net).weight.shape[0])
        except (ValueError, TypeError, AttributeError):
            num_classes = None
    if data_config is None and arch:
        try:
            data_config = registry.get_data_config(arch)
        except registry.UnknownModelError:
            data_config = None
    dc = data_config.as_dict() if isinstance(data_config, DataConfig) else (dict(data_config) if data_config else None)
    try:
        args_json = json.dumps(arch_args or {})
    except TypeError as e:
        raise ValueError(f"arch_args must be JSON-serialisable to export them: {e}") from None
    meta = {"format": "pt", "arch_args": args_json}
    if arch:
        meta["arch"] = arch
    if num_classes is not None:
        meta["num_classes"] = str(num_classes)
    if dc:
        meta["data_config"] = json.dumps(dc)
    # clone: safetensors refuses tensors sharing storage (tied weights, views)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}

    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path
    path.mkdir(parents=True, exist_ok=True)
    _atomic(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    cfg: dict[str, Any] = {
        "architecture": arch[len(registry.TIMM_PREFIX):] if arch and arch.startswith(registry.TIMM_PREFIX) else arch,
        "num_classes": num_classes,
        "zoo": {"arch": arch, "arch_args": arch_args or {}},
    }
    if dc:
        cfg["pretrained_cfg"] = {
            "input_size": [3, dc["input_size"], dc["input_size"]],
            "crop_pct": dc["crop_pct"],
            "interpolation": dc["interpolation"],
            "mean": dc["mean"],
            "std": dc["std"],
            "num_classes": num_classes,
        }
    _atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n"))
    return path


def _atomic(path: pathlib.Path, write: Callable[[pathlib.Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
