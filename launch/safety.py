"""What keeps a run safe to start, to kill and to read: checks before anything is written,
atomic and unpickling-free checkpoint files, run names that stay in the run root, no secrets
in what a run writes.

Used by the ``zoo`` command (``launch/zoo_cli.py``, ``launch/errors.py``) only (launch/ is imported by nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class ConfigError(ValueError):
    """A user's configuration that cannot run (the CLI prints it in one line and exits 2)."""


# --------------------------------------------------------------------------- run names

_NAME_OK = re.compile(r"^[A-Za-z0-9_.+=@-]+$")


def check_run_name(name: str) -> str:
    """``--run.name`` is one directory level under ``--run.root``: no separator, no ``..``.

    A run directory elsewhere is asked for explicitly with ``--run.root``.
    """
    if not name or name in (".", "..") or not _NAME_OK.match(name):
        raise ConfigError(
            f"run.name={name!r} must be one folder name (letters, digits, _ . + = @ -; no '/' or '..'): "
            "to write elsewhere, set --run.root to that folder"
        )
    return name


# --------------------------------------------------------------------------- nothing half-written

_CREATED: list[Path] = []  # directories this process created for its run (removed if it fails before any checkpoint)


def make_run_dir(run_dir: Path) -> None:
    """``mkdir -p run_dir``, remembering the topmost folder this call created."""
    first_new = run_dir
    while not first_new.parent.exists():
        first_new = first_new.parent
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not existed:
        _CREATED.append(first_new)


def discard_failed_run(delete: bool = True) -> list[Path]:
    """After a user error: close the W&B run and delete the directories this process created,
    unless a checkpoint was written into them (that is a run worth resuming, not a half-start).
    Returns what was deleted."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=2)
    removed = []
    while _CREATED and not delete:
        _CREATED.pop()
    while _CREATED:
        d = _CREATED.pop()
        if d.is_dir() and not any(d.rglob("*.ckpt")):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --------------------------------------------------------------------------- checkpoints

class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with two changes.

    * Saving is atomic on the local file system: ``torch.save`` into a temporary file in the
      same folder, ``fsync``, ``os.replace`` onto the name, ``fsync`` the folder. A kill at any
      moment leaves the previous ``last.ckpt`` or the new one, never a truncated file.
      (Lightning's own ``_atomic_save`` goes through an fsspec transaction, whose local
      temporary file lies in ``/tmp``: the final move is a copy when ``/tmp`` is another file
      system, and nothing is fsynced.) Remote paths (``s3://``...) keep Lightning's way.
    * Loading never unpickles code: ``torch.load(weights_only=True)`` with the zoo's safe
      globals, whatever ``weights_only`` Lightning passes (2.6 defaults to False for resume
      and ``--ckpt_path``). A checkpoint holding other Python objects is refused in one line.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as shareable as any file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_load(path)  # map_location: the CPU (Lightning moves the tensors itself)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def safe_load(path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ``WeightsError`` in one line if the
    file is missing, truncated, or holds pickled objects that could run code."""
    from zoo.weights.sources import WeightsError, torch_load

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass a .ckpt file (e.g. <run dir>/checkpoints/last.ckpt)")
    if mmap:
        try:
            return torch_load(path, mmap=True)
        except WeightsError:  # legacy (non-zip) files cannot be mmapped: the plain load says what is wrong
            pass
    return torch_load(path)


# --------------------------------------------------------------------------- secrets

# ``scheme://user:token@host``, ``hf_...`` Hugging Face tokens, W&B keys (40 hex), ``token=...``
_SECRET_PATTERNS = [
    (re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"), "***:***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), "hf_***"),
    (re.compile(r"(?i)((?:token|api_key|apikey|password|secret)=)[^&\s'\"]+"), r"\1***"),
]


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***`` (URLs with user:token@, hf_ tokens,
    ``token=`` query values, and the values of secret environment variables)."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    for var in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    return text
