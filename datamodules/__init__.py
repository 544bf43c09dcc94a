"""LightningDataModules: ImageNet-format folders through FFCV (or torchvision), and the embedded
synthetic dataset. Importing this package is cheap: Lightning, torch and ffcv load on first use."""

from .cpus import numba_layer_for_one_cpu
from .folder import DataError
from .synthetic import NUM_CLASSES, default_root, make_synthetic_imagenet

numba_layer_for_one_cpu()  # before ffcv starts numba's threads: TBB hangs at exit on one CPU

__all__ = ["DataError", "ImageNetDataModule", "NUM_CLASSES", "count_classes", "default_root", "make_synthetic_imagenet"]


def __getattr__(name: str):
    if name in ("ImageNetDataModule", "count_classes"):
        from . import imagenet

        return getattr(imagenet, name)
    raise AttributeError(name)
