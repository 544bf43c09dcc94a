"""torch.hub entry points: one per registered model, all through ``zoo.load``.

    model = torch.hub.load("<owner>/<repo>", "resnet50", weights="torchvision:ResNet50_Weights.IMAGENET1K_V2")
    model = torch.hub.load("<owner>/<repo>", "convnext_tiny", weights="hf-hub:timm/convnext_tiny.fb_in1k")
    model = torch.hub.load("<owner>/<repo>", "convnet", weights="/path/to/last.ckpt")

Each returns an ``ImageClassifier`` (a LightningModule; the bare network is ``model.net``),
through ``zoo.load``: the same tensors and the same preprocessing (``model.data_config``) as
every other loading path, EMA weights of a checkpoint unless ``use_ema=False``.
``torch.hub.list`` shows the names; ``torch.hub.help(repo, name)`` the arguments.
"""

dependencies = ["torch", "timm", "torchvision"]

from zoo import list_models as _list_models  # noqa: E402
from zoo import load as _load  # noqa: E402


def _entry(name: str):
    def entry(weights=None, **kwargs):
        return _load(name, weights=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name} as an ImageClassifier.\n\n"
        "    weights: None (random init), a .ckpt/.pth/.safetensors file, a Hugging Face snapshot\n"
        "        folder, 'hf-hub:<repo>' or 'torchvision:<Model>_Weights.<NAME>'.\n"
        "    kwargs: zoo.load arguments (num_classes, use_ema, strict) and ImageClassifier\n"
        "        arguments (arch_args={...}, lr, ...).\n"
    )
    return entry


for _name in _list_models():
    globals()[_name] = _entry(_name)
del _name
