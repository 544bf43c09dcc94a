"""FFCV I/O: .beton files, pipelines and Loaders.

- :mod:`.beton`: write a class folder or dataset to a .beton (atomic, parameters recorded in a
  sidecar), check it against the data options, read its header and labels;
- :mod:`.pipelines`: the train/val/label pipelines, and the check that ffcv can build them;
- :mod:`.loader`: :func:`make_loader`, the :class:`ClosingLoader` around each ffcv Loader
  (abandoned epochs end their thread, an epoch resumes at a batch) and the :class:`LoaderPool`;
- :mod:`._compat`: every use of ffcv's internals, with the ffcv issue each answers.

Importing this package does not import ffcv; each function does when called.
"""

from .beton import (
    DEFAULT_COMPRESS_PROBABILITY,
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_RESOLUTION,
    SIDECAR_FORMAT,
    WriteParams,
    beton_info,
    beton_labels,
    beton_lock,
    check_beton,
    read_sidecar,
    sidecar_path,
    write_beton,
)
from ._compat import import_ffcv
from .loader import LOADER_POOL, ClosingLoader, LoaderPool, OrderName, make_loader
from .pipelines import assert_pipeline_safe, label_pipeline, pipeline_jit_modes, train_image_pipeline, val_image_pipeline

__all__ = [
    "DEFAULT_COMPRESS_PROBABILITY",
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_MAX_RESOLUTION",
    "LOADER_POOL",
    "SIDECAR_FORMAT",
    "ClosingLoader",
    "LoaderPool",
    "OrderName",
    "WriteParams",
    "assert_pipeline_safe",
    "beton_info",
    "beton_labels",
    "beton_lock",
    "check_beton",
    "import_ffcv",
    "label_pipeline",
    "make_loader",
    "pipeline_jit_modes",
    "read_sidecar",
    "sidecar_path",
    "train_image_pipeline",
    "val_image_pipeline",
    "write_beton",
]
