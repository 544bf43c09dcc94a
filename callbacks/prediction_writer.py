"""Write `zoo predict`'s class probabilities: one CSV row per image, in dataset order, plus the matrix.

``<dir>/predictions.csv``: ``index, path, target, class_1, prob_1, ..., class_5, prob_5``
(top-5 class names and probabilities; ``target`` is the labelled class, empty for unlabelled
images). ``<dir>/probabilities.npy``: the full ``N x num_classes`` float32 matrix, row ``i`` =
image ``i`` of the dataset.

Under DDP each rank saves its rows with their dataset indices to ``<dir>/.predict-parts/``;
after a barrier rank 0 merges them by index. Every index must appear exactly once, so a padded
sampler (duplicates) or a missing part is an error, not a silently wrong file.

Which image a row is comes from the DataModule when it says (``predict_indices()``: the
dataset indices this rank predicts, in order; ``predict_paths()``: every image's path), else
from Lightning's ``batch_indices`` (a map-style DataLoader). Class names come from the model
(``class_names`` attribute or hyper-parameter), else the DataModule (``class_names``), else the
class index.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

PARTS = ".predict-parts"


class PredictionWriter(BasePredictionWriter):
    """Args:
    output_dir: where the files go; None: the trainer's ``default_root_dir`` (the run directory).
    top_k: class columns per row (fewer if the model has fewer classes).
    """

    def __init__(self, output_dir: Optional[str] = None, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        self.output_dir, self.top_k = output_dir, top_k
        self.csv_path: Optional[Path] = None
        self._probs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._batch_indices: list[Any] = []

    def _dir(self, trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir).expanduser()

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._probs, self._targets, self._batch_indices = [], [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        # copies: on the CPU .cpu() is a no-op, and ffcv's batches are views into buffers it reuses
        self._probs.append(prediction.detach().to("cpu", torch.float32, copy=True))
        n = prediction.shape[0]
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self._targets.append(target.detach().reshape(-1).to("cpu", torch.int64, copy=True) if torch.is_tensor(target)
                             else torch.full((n,), -1))
        self._batch_indices.append(batch_indices)

    def _local_indices(self, trainer, n: int) -> np.ndarray:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "predict_indices"):
            idx = np.asarray(dm.predict_indices(), dtype=np.int64)
        elif all(b is not None and len(b) for b in self._batch_indices):
            idx = np.asarray([i for b in self._batch_indices for i in b], dtype=np.int64)
        elif trainer.world_size == 1:
            idx = np.arange(n)
        else:
            raise RuntimeError("PredictionWriter cannot tell which images this rank predicted: "
                               "give the DataModule a predict_indices() method or use a map-style DataLoader")
        if len(idx) != n:
            raise RuntimeError(f"rank {trainer.global_rank} predicted {n} images but its loader lists {len(idx)}")
        return idx

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        out = self._dir(trainer)
        probs = torch.cat(self._probs) if self._probs else torch.zeros(0, 0)
        targets = torch.cat(self._targets) if self._targets else torch.zeros(0, dtype=torch.long)
        indices = torch.from_numpy(self._local_indices(trainer, probs.shape[0]))
        self._probs, self._targets = [], []
        parts = out / PARTS
        if trainer.world_size > 1:
            parts.mkdir(parents=True, exist_ok=True)
            torch.save({"indices": indices, "probs": probs, "targets": targets}, parts / f"rank{trainer.global_rank}.pt")
            trainer.strategy.barrier("prediction_writer_parts")
        if trainer.is_global_zero:
            if trainer.world_size > 1:
                loaded = [torch.load(parts / f"rank{r}.pt", weights_only=True) for r in range(trainer.world_size)]
                indices = torch.cat([p["indices"] for p in loaded])
                probs = torch.cat([p["probs"] for p in loaded])
                targets = torch.cat([p["targets"] for p in loaded])
                shutil.rmtree(parts, ignore_errors=True)
            self.csv_path = self._write(trainer, pl_module, out, indices, probs, targets)
            print(f"predictions: {self.csv_path} ({len(indices)} images; probabilities: {out / 'probabilities.npy'})", flush=True)
        if trainer.world_size > 1:
            trainer.strategy.barrier("prediction_writer_done")

    def _write(self, trainer, pl_module, out: Path, indices, probs, targets) -> Path:
        order = torch.argsort(indices)
        indices, probs, targets = indices[order], probs[order], targets[order]
        n = len(indices)
        if not torch.equal(indices, torch.arange(n)):
            dup = (indices[1:] == indices[:-1]).sum().item()
            raise RuntimeError(f"predicted image indices are not 0..{n - 1} once each ({dup} duplicates): "
                               "the predict loader pads or drops images")
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "probabilities.npy", probs.numpy())
        names = _class_names(trainer, pl_module, probs.shape[1])
        dm = trainer.datamodule
        paths = dm.predict_paths() if dm is not None and hasattr(dm, "predict_paths") else None
        k = min(self.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        path = out / "predictions.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "path", "target", *[c for j in range(1, k + 1) for c in (f"class_{j}", f"prob_{j}")]])
            for i in range(n):
                t = int(targets[i])
                row = [i, paths[i] if paths is not None else "", names[t] if 0 <= t < len(names) else ""]
                for p, c in zip(top_p[i].tolist(), top_i[i].tolist()):
                    row += [names[c], f"{p:.6f}"]
                w.writerow(row)
        return path


def _class_names(trainer, pl_module, num_classes: int) -> list[str]:
    for source in (pl_module, getattr(pl_module, "hparams", None), trainer.datamodule):
        names = None
        if source is not None:
            names = source.get("class_names") if isinstance(source, dict) else getattr(source, "class_names", None)
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]
