"""What the `zoo` command prints: the run directory, progress, results, where the files are,
and real warnings; third-party notices that ask nothing of the user only with ``--verbose``
(or ``ZOO_VERBOSE=1``).

Hidden by default (each is printed on every run, on every machine, and needs no action):

* Lightning's tips recommending the LitLogger and litmodels products (``logger_connector.py``,
  ``callback_connector.py``).
* "The `srun` command is available on your system but is not used" (Lightning's
  SLURMEnvironment, shown on any machine where Slurm is installed, also outside a job).
* "SLURM auto-requeueing enabled. Setting signal handlers." (Lightning's; under Slurm the zoo's
  SlurmRequeue handler runs instead and prints its own line).
* "GPU available: ..., used: ...", "TPU available: ...", "Seed set to N" (the run's config.yaml
  holds the seed and the accelerator), "Loading `train_dataloader` to estimate ...".
* Lightning's internal use of a deprecated torch pytree API, and its hint that the model
  overrides ``on_after_batch_transfer`` (the zoo normalises on the device on purpose).
* W&B's banner: offline (the default) ``WANDB_SILENT``, since the CLI prints the one line that
  matters, the ``wandb sync`` command, itself; online ``WANDB_QUIET`` (the run page's URL stays).
"""

from __future__ import annotations

import logging
import os
import warnings

NOISE = (
    "litlogger",  # "💡 Tip: ... try installing [litlogger]"
    "litmodels",  # "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]"
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "Loading `train_dataloader` to estimate number of stepping batches",
    # callbacks.preemption.SlurmRequeue's handler runs instead of Lightning's; it says so itself
    "SLURM auto-requeueing enabled",
)

# Warnings that ask nothing of a zoo user: Lightning's own use of a deprecated torch API, and
# the hint that ImageClassifier overrides on_after_batch_transfer (it does: normalisation on
# the device is the design, DESIGN.md).
NOISY_WARNINGS = (
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in NOISE)


def configure(verbose: bool) -> None:
    """Install the filters (idempotent); ``verbose`` shows everything."""
    if verbose or os.environ.get("ZOO_VERBOSE", "") not in ("", "0"):
        return
    if os.environ.get("WANDB_MODE", "offline") == "online":
        os.environ.setdefault("WANDB_QUIET", "true")  # keeps the run page's URL
    else:  # offline: the banner is 4 lines about syncing; the CLI prints the `wandb sync` command
        os.environ.setdefault("WANDB_SILENT", "true")
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.pytorch.trainer.connectors.signal_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
