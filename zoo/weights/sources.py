"""Reading a weights source into memory: files, Hugging Face folders, hub ids, state_dicts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .. import registry
from ..registry import DataConfig

Source = Union[str, os.PathLike, Mapping]

# Hugging Face snapshot folder files, in order of preference (safetensors first: no pickle).
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the first line says why."""


@dataclass
class Weights:
    """A source read into memory (:func:`read_weights`): tensors plus what it says about itself."""

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


def torch_load(path: pathlib.Path, mmap: bool = False) -> Any:
    # Plain-data classes that training scripts put next to the tensors: paths in
    # hyper-parameters (data roots), argparse.Namespace in timm's train.py and the
    # facebookresearch main.py checkpoints ("args"). Building them runs no user code.
    safe = [
        pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
        argparse.Namespace,
    ]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    from ..timm_model import data_config_from_timm

    if isinstance(d.get("input_size"), int):  # ours: square size
        d = dict(d, input_size=(3, d["input_size"], d["input_size"]))
    return data_config_from_timm(dict(d))


def _tensors_only(sd: Mapping) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def ema_state_dict(checkpoint: Mapping) -> Optional[tuple[str, dict[str, torch.Tensor]]]:
    """``(callback key, EMA tensors keyed like pl_module.net)`` of a Lightning checkpoint, or None.

    The WeightEMA callback keeps its average in ``checkpoint["callbacks"][<key containing
    "WeightEMA">]["ema_state_dict"]`` (callbacks/ema.py); every loading path reads it here.
    """
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if "WeightEMA" in str(key) and isinstance(state, Mapping) and state.get("ema_state_dict"):
            ema = _tensors_only(state["ema_state_dict"])
            return str(key), {k[4:] if k.startswith("net.") else k: v for k, v in ema.items()}
    return None


def _from_container(obj: Any, name: str, use_ema: bool) -> Weights:
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
        w = Weights(
            name, sd, "lightning", arch=hp.get("arch"), num_classes=hp.get("num_classes"),
            arch_args=hp.get("arch_args"), hparams=hp,
            data_config=_data_config_from_dict(obj.get("zoo_data_config")),
        )
        if w.data_config is not None and w.data_config.label_names is None and obj.get("zoo_classes"):
            w.data_config = dataclasses.replace(w.data_config, label_names=tuple(map(str, obj["zoo_classes"])))
        found = ema_state_dict(obj)
        if found is not None and use_ema:
            # EMA covers parameters and float buffers; integer buffers (num_batches_tracked)
            # come from the state_dict.
            w.state_dict = {**sd, **found[1]}
            w.ema = True
        return w
    # timm train.py checkpoint
    if isinstance(obj.get("state_dict"), Mapping):
        if use_ema and _is_state_dict(obj.get("state_dict_ema")):
            return Weights(name, _tensors_only(obj["state_dict_ema"]), "checkpoint", ema=True)
        return Weights(name, _tensors_only(obj["state_dict"]), "checkpoint")
    # facebookresearch (ConvNeXt, DeiT, MAE ...) main.py checkpoints: {"model": ..., "model_ema": ...}
    if isinstance(obj.get("model"), Mapping):
        if use_ema and _is_state_dict(obj.get("model_ema")):
            return Weights(name, _tensors_only(obj["model_ema"]), "checkpoint", ema=True)
        return Weights(name, _tensors_only(obj["model"]), "checkpoint")
    sd = _tensors_only(obj)
    if not sd:
        raise WeightsError(f"{name} holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    return Weights(name, sd, "state_dict")


def _read_file(path: pathlib.Path, name: str, use_ema: bool) -> Weights:
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        nc = meta.get("num_classes")
        return Weights(
            name, tensors, "safetensors", arch=meta.get("arch") or None,
            num_classes=int(nc) if nc and nc.isdigit() else None,
            arch_args=_json_or_none(meta.get("arch_args")),
            data_config=_data_config_from_dict(_json_or_none(meta.get("data_config"))),
        )
    return _from_container(torch_load(path), name, use_ema)


def _read_folder(folder: pathlib.Path, name: str, use_ema: bool, fmt: str = "hf-folder") -> Weights:
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
        w = Weights(name, sd, fmt)
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


def _read_hf_hub(spec: str, use_ema: bool) -> Weights:
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


def _read_torchvision_hub(spec: str) -> Weights:
    import urllib.error

    import torchvision.models as tvm

    enum_name = spec[len("torchvision:"):]
    try:
        w = tvm.get_weight(enum_name)
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(
            f"{spec}: torchvision has no such weights; use 'torchvision:<Model>Weights.<NAME>', "
            "e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2"
        ) from None
    t = w.transforms()  # ImageClassification: crop_size, resize_size, interpolation, mean, std
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0]) if t.resize_size else crop
    data_config = DataConfig(
        input_size=crop, crop_pct=crop / resize, mean=tuple(t.mean), std=tuple(t.std),
        interpolation=t.interpolation.value,
        label_names=tuple(w.meta["categories"]) if w.meta.get("categories") else None,
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
    return Weights(
        spec, _tensors_only(sd), "torchvision-hub", arch=_torchvision_builder_name(w),
        num_classes=len(w.meta.get("categories") or []) or None, data_config=data_config,
    )


def read_weights(source: Any, use_ema: bool = True) -> Weights:
    """Read any supported source into memory: the tensors and what the source says about itself.

    A :class:`Weights` passes through unchanged, so a caller reads once and hands the result
    to :func:`~zoo.weights.load_weights` (``zoo.create`` counts the classes and loads from one read).
    """
    if isinstance(source, Weights):
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


