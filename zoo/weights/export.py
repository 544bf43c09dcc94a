"""Writing weights with what rebuilds the model: safetensors files and Hugging Face folders."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

from torch import nn

from .. import heads, registry
from ..registry import DataConfig

def export_safetensors(
    model_or_net: nn.Module,
    path: Union[str, os.PathLike],
    *,
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    arch_args: Optional[dict] = None,
    data_config: Union[DataConfig, Mapping, None] = None,
    class_names: Optional[Sequence[str]] = None,
) -> pathlib.Path:
    """Write the network's weights as safetensors, with what rebuilds the model in the header.

    ``path`` ending in ``.safetensors``: one file; metadata ``arch``, ``num_classes``,
    ``arch_args`` (JSON), ``data_config`` (JSON) and ``class_names`` (JSON, when given). Any other ``path``: a Hugging Face
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
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
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
    if class_names is not None:
        cfg["label_names"] = list(class_names)  # timm's config.json key
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

