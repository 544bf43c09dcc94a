"""State-dict I/O for zoo networks: read weights from wherever they were published or trained,
fit their keys to a network, convert key layouts, export.

A small package split by concern: ``sources`` reads a file / folder / hub id into memory
(:func:`read_weights`), ``matching`` fits its keys to a network (wrapper prefixes, the families'
registered key layouts, the head) and copies them in (:func:`load_weights`), ``export`` writes
safetensors / Hugging Face folders. It works on bare networks and imports nothing of the model
(``zoo.base``): building an ImageClassifier from weights is ``zoo.load`` / ``zoo.create``
(``zoo/factory.py``), one layer up. Sources:

- this project's Lightning ``.ckpt`` (``state_dict`` under ``net.``; the ``WeightEMA``
  callback's EMA weights are used when present and ``use_ema=True``); its
  ``hyper_parameters`` rebuild the model and its ``zoo_data_config`` is the preprocessing
  (``zoo.load(weights="last.ckpt")``);
- plain ``state_dict`` files (torchvision, timm, ``torch.save(net.state_dict())``), timm
  training checkpoints (``state_dict`` / ``state_dict_ema``), facebookresearch/ConvNeXt
  ``.pth`` files (``{"model": ...}``);
- ``.safetensors`` files (the metadata written by :func:`export_safetensors` rebuilds the
  model) and Hugging Face snapshot folders (``model.safetensors`` or ``pytorch_model.bin``
  plus ``config.json``, as timm's ``push_to_hub`` writes them);
- hub ids: ``hf-hub:timm/convnext_tiny.fb_in1k`` (``@revision`` allowed) and
  ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` (downloaded once into the usual caches).

Keys are matched after removing wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``, ``net.``/``model.`` from LightningModules) and, where the keys do not fit
as they are, through the key layouts the families register (``zoo/convnext.py``: the official
layout via timm's ``checkpoint_filter_fn``, torchvision's <-> timm's). A head with another class
count is not loaded (the model keeps its freshly built head) and the report says so; any
other mismatch raises :class:`WeightsError`. Files are read with
``torch.load(..., map_location="cpu", weights_only=True)``: a file that needs to run code
to unpickle is refused.
"""

from .export import export_safetensors
from .matching import LoadReport, head_classes, load_weights
from .sources import Source, Weights, WeightsError, ema_state_dict, read_weights

__all__ = [
    "LoadReport", "Source", "Weights", "WeightsError", "ema_state_dict", "export_safetensors", "head_classes",
    "load_weights", "read_weights",
]
