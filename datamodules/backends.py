"""The loading backends behind :class:`~datamodules.imagenet.ImageNetDataModule`: one small interface.

A backend turns the DataModule's resolved options (root, resolutions, crop ratio, batch size,
augmentation) into loaders of ``(uint8 images N x 3 x H x W, int64 labels N)`` batches. Adding
one (e.g. DALI) is one new file with a :class:`Backend` subclass plus one line in
:data:`BACKENDS`; the DataModule has no backend-specific code.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from .folder import DataError

if TYPE_CHECKING:
    from .imagenet import ImageNetDataModule

# name -> "module:Class" inside this package, imported on use (ffcv must not load for torchvision).
BACKENDS: dict[str, str] = {
    "ffcv": "ffcv_backend:FFCVBackend",
    "torchvision": "torchvision_backend:TorchvisionBackend",
}


class Backend(ABC):
    """How one DataModule prepares and loads its data.

    The DataModule calls, in order: :meth:`prepare` (once per node, local rank 0), :meth:`setup`
    (every process), then :meth:`loader` per split, :meth:`set_train_resolution` between
    epochs and :meth:`teardown`. A backend reads the DataModule's resolved options
    (``dm.hparams``, ``dm.train_resolution``, ``dm.val_resolution``, ``dm.val_crop``,
    ``dm.interpolation``, ``dm.per_device_batch_size``, ``dm.samples(split)``) and keeps its own
    state (built decoders, transforms).

    Evaluation loaders (``train=False``) must give every sample exactly once across the
    ``world_size`` processes, in dataset order within a rank: rank ``r`` loads the samples
    ``r, r + world_size, ...`` (:func:`eval_indices`), never padded duplicates.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules the backend needs
    install_hint: ClassVar[str] = ""  # what to run when one is missing
    keeps_loaders: ClassVar[bool] = True  # False: the DataModule drops built loaders after fit

    def __init__(self, dm: ImageNetDataModule) -> None:
        self.dm = dm

    @classmethod
    def check_installed(cls) -> None:
        """Raise DataError in one line naming the missing package and the install command."""
        import importlib.util

        for module in cls.requires:
            if importlib.util.find_spec(module) is None:
                raise DataError(f"data.backend={cls.name!r} needs {module!r}, which is not installed: {cls.install_hint}")

    @abstractmethod
    def prepare(self) -> None:
        """One-time work on local rank 0 (write files, check images); idempotent."""

    @abstractmethod
    def is_prepared(self) -> bool:
        """Whether :meth:`prepare` has left what :meth:`setup` needs on this node."""

    @abstractmethod
    def setup(self) -> None:
        """Check the prepared data on every process (raise DataError for a user's problem)."""

    @abstractmethod
    def loader(self, split: str, *, train: bool, rank: int, world_size: int) -> Any:
        """An iterable of batches for ``split`` (``train``: random crops, shuffled, split across ranks)."""

    @abstractmethod
    def set_train_resolution(self, res: int) -> None:
        """Make an already built train loader produce ``res`` px crops from its next epoch on."""

    def on_train_epoch(self, loader: Any, epoch: int) -> None:
        """Called before each train epoch with the loader the trainer will iterate."""

    def teardown(self, stage: str) -> None:
        """Release what :meth:`loader` built when a stage ends (worker processes...)."""


def eval_indices(num_samples: int, rank: int, world_size: int) -> range:
    """The samples rank ``rank`` evaluates: each one exactly once across the ranks, no padding."""
    return range(rank, num_samples, world_size)


def get_backend(name: str) -> type[Backend]:
    """The Backend class registered as ``name``; DataError listing the known ones otherwise."""
    if name not in BACKENDS:
        raise DataError(f"data.backend={name!r} is unknown: use one of {', '.join(map(repr, BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), cls)


__all__ = ["BACKENDS", "Backend", "eval_indices", "get_backend"]
