"""LightningDataModules: ImageNet-format folders through FFCV (or torchvision), and the embedded
synthetic dataset. Importing this package is cheap: Lightning, torch and ffcv load on first use."""

import logging

from .cpus import numba_layer_for_one_cpu
from .folder import DataError
from .synthetic import NUM_CLASSES, default_root, make_synthetic_imagenet

numba_layer_for_one_cpu()  # before ffcv starts numba's threads: TBB hangs at exit on one CPU

# The package's log lines (``logging.getLogger(__name__)`` in each module) show at INFO, on stderr
# when the application configured no logging, as Lightning's own do (lightning/pytorch/__init__.py);
# else they propagate to its handlers. Silence or redirect them with the standard configuration:
# ``logging.getLogger("datamodules").setLevel(logging.WARNING)``.
_log = logging.getLogger(__name__)
if _log.level == logging.NOTSET:
    _log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.propagate = False

__all__ = ["DataError", "ImageNetDataModule", "NUM_CLASSES", "count_classes", "default_root", "make_synthetic_imagenet"]


def __getattr__(name: str):
    if name in ("ImageNetDataModule", "count_classes"):
        from . import imagenet

        return getattr(imagenet, name)
    raise AttributeError(name)
