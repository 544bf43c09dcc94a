"""Dashboard: what a run's W&B (or TensorBoard) page needs to answer "is the data right, is it learning".

- ``flops_per_batch`` for Lightning's ThroughputMonitor (throughput per device and global, MFU
  where the device's peak is known), measured with ``measure_flops`` on a meta-device copy of
  the network, again whenever the batch shape changes (progressive resizing);
- a grid of the first training batch as the network sees it: after the loader's crops and
  flips and the module's device augmentation (``augment.post_normalise`` is replayed on a copy
  under a forked RNG, so training draws the same numbers with or without this callback);
- every ``every_n_epochs`` validations and at the last epoch, a confusion matrix and the most
  confidently wrong images (W&B Table with image, label, prediction, confidence; TensorBoard
  images), gathered over all ranks. They are built from the logits the module's
  ``validation_step`` returns (``{"loss", "logits"}``; a second forward pass only for a module
  that returns no logits). The hot path stays on the device: per batch a top-k merge and a
  confusion-matrix update, no host sync; images come to the host once per such validation.
  Drawing and logging them every epoch cost more than a default callback may on a short CPU
  fit (benchmarks/results/peers.md), hence every 5th epoch by default.

PNG copies go to ``<run dir>/plots`` so CSV-logged runs have them too, drawn for a person
(``callbacks.plots``): the confusion matrix with class names, counts and axes, each image with
its caption; beside them ``val_confusion_matrix.pt`` (the counts) and JSON files with the class
names and captions, which the run report (``callbacks.run_report``) reads. Works with any module of
the zoo (``ImageClassifier``: ``pixel_mean``/``pixel_std`` buffers, optional ``augment``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn


class Dashboard(Callback):
    def __init__(self, num_images: int = 16, num_wrong: int = 8, max_confusion_classes: int = 100,
                 plots_dir: Optional[str] = None, every_n_epochs: int = 5) -> None:
        if num_images < 1 or num_wrong < 0:
            raise ValueError(f"num_images must be >= 1 and num_wrong >= 0, got {num_images}, {num_wrong}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 (1: every validation), got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.num_wrong = num_wrong
        self.max_confusion_classes = max_confusion_classes  # a 1000x1000 heatmap says little; kept as a file
        self.plots_dir = Path(plots_dir) if plots_dir else None
        self._flops_shape: Optional[tuple] = None
        self._grid_logged = False
        self._confmat = None
        self._wrong: Optional[tuple[torch.Tensor, ...]] = None

    # ------------------------------------------------------------------ throughput
    def _measure_flops(self, pl_module: LightningModule, images: torch.Tensor) -> None:
        from lightning.fabric.utilities.throughput import measure_flops

        shape = tuple(images.shape)
        if shape == self._flops_shape:
            return
        self._flops_shape = shape
        net = getattr(pl_module, "net", pl_module)
        try:
            with torch.device("meta"):
                meta_net = copy.deepcopy(net).to("meta")
                x = torch.empty(shape, device="meta")
            pl_module.flops_per_batch = measure_flops(meta_net, lambda: meta_net(x), lambda y: y.sum())
        except Exception as e:  # a layer without a meta kernel: throughput without FLOPs/MFU
            rank_zero_warn(f"Dashboard: FLOPs of {type(net).__name__} not measurable on the meta device ({e})")

    # ------------------------------------------------------------------ train images
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        self._measure_flops(pl_module, images)
        if self._grid_logged or trainer.sanity_checking:
            return
        self._grid_logged = True
        x, y = images[: self.num_images], labels[: self.num_images]
        augment = getattr(pl_module, "augment", None)
        if augment is not None and hasattr(augment, "post_normalise"):
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                x, _ = augment.post_normalise(x.clone(), y)
        if trainer.is_global_zero:
            classes = self._class_names(trainer, int(pl_module.hparams.get("num_classes", 0) or 0))
            names = [classes[int(i)] if 0 <= int(i) < len(classes) else str(int(i)) for i in y.tolist()]
            self._log_figure(trainer, "train/augmented_batch", self._figure_of_images(
                pl_module, x, names, "the first training batch as the network sees it (augmented), with its labels"),
                caption=f"labels {names}", meta={"epoch": trainer.current_epoch, "captions": names})

    # ------------------------------------------------------------------ validation
    def _due(self, trainer: Trainer) -> bool:
        """This validation draws the confusion matrix and mistakes: every ``every_n_epochs``-th
        epoch, the last epoch of the fit, or a validation outside fit (``zoo validate``)."""
        if trainer.sanity_checking:
            return False
        if not trainer.training and trainer.state.fn != "fit":
            return True
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return last or trainer.should_stop or epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        n = int(pl_module.hparams.get("num_classes", 0)) if hasattr(pl_module, "hparams") else 0
        if n < 2 or not self._due(trainer):
            self._confmat = None
            return
        if self._confmat is None or self._confmat.num_classes != n:
            self._confmat = MulticlassConfusionMatrix(num_classes=n).to(pl_module.device)
        self._confmat.reset()
        self._wrong = None

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._confmat is None or trainer.sanity_checking:
            return
        x, y = batch[0], batch[1]
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is None:
            with torch.no_grad():
                logits = pl_module(x)
        probs = logits.detach().float().softmax(-1)
        conf, pred = probs.max(-1)
        self._confmat.update(pred, y)
        if not self.num_wrong:
            return
        # keep the k most confident mistakes so far, on the device (no host sync per batch)
        score = torch.where(pred != y, conf, torch.full_like(conf, -1.0))
        cand = (score, x.detach(), y, pred)
        if self._wrong is not None:
            cand = tuple(torch.cat([a, b]) for a, b in zip(self._wrong, cand))
        k = min(self.num_wrong, cand[0].shape[0])
        top = cand[0].topk(k).indices
        self._wrong = tuple(t[top] for t in cand)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._confmat is None or trainer.sanity_checking:
            return
        cm = self._confmat.compute()  # summed over ranks
        wrong = None
        if self._wrong is not None and self.num_wrong:
            k = self.num_wrong
            pad = k - self._wrong[0].shape[0]  # equal sizes on every rank for all_gather
            w = self._wrong
            if pad > 0:
                w = (torch.cat([w[0], w[0].new_full((pad,), -1.0)]),
                     torch.cat([w[1], w[1].new_zeros((pad, *w[1].shape[1:]))]),
                     torch.cat([w[2], w[2].new_zeros(pad)]), torch.cat([w[3], w[3].new_zeros(pad)]))
            g = [t.reshape(-1, *t.shape[2:]) if trainer.world_size > 1 else t for t in pl_module.all_gather(w)]
            top = g[0].topk(k).indices
            wrong = [t[top] for t in g]
        if not trainer.is_global_zero:
            return
        step_epoch = trainer.current_epoch
        classes = self._class_names(trainer, cm.shape[0])
        self._log_confusion(trainer, cm.cpu(), classes, step_epoch)
        if wrong is not None:
            self._log_wrong(trainer, pl_module, wrong, classes)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _class_names(trainer: Trainer, n: int) -> list[str]:
        dm = getattr(trainer, "datamodule", None)
        names = getattr(dm, "classes", None)
        return list(names) if names and len(names) == n else [str(i) for i in range(n)]

    @staticmethod
    def _to_uint8(pl_module: LightningModule, x: torch.Tensor) -> torch.Tensor:
        """Undo the module's normalisation (mean/std in 0..255 units): uint8 NCHW on the host."""
        mean = getattr(pl_module, "pixel_mean", None)
        std = getattr(pl_module, "pixel_std", None)
        x = x.float()
        if mean is not None and std is not None:
            x = x * std.to(x.device) + mean.to(x.device)
        return x.clamp(0, 255).round().to(torch.uint8).cpu()

    def _figure_of_images(self, pl_module: LightningModule, x: torch.Tensor, captions: list[str], title: str):
        from callbacks.plots import image_grid_figure

        return image_grid_figure(self._to_uint8(pl_module, x).numpy(), captions, title=title)

    def _save_png(self, trainer: Trainer, name: str, image: torch.Tensor) -> None:
        from torchvision.io import write_png

        write_png(image, str(self._plots(trainer) / f"{name}.png"))

    def _log_figure(self, trainer: Trainer, key: str, fig, caption: str = "", meta: Optional[dict] = None) -> None:
        """A matplotlib figure to the loggers and plots/ (as _log_image), its metadata as JSON beside it."""
        from callbacks.plots import to_rgb

        image = torch.from_numpy(to_rgb(fig)).permute(2, 0, 1).contiguous()
        self._log_image(trainer, key, image, caption=caption)
        if meta is not None:
            (self._plots(trainer) / f"{key.replace('/', '_')}.json").write_text(json.dumps(meta))

    def _plots(self, trainer: Trainer) -> Path:
        out = self.plots_dir or Path(trainer.default_root_dir) / "plots"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _log_image(self, trainer: Trainer, key: str, image: torch.Tensor, caption: str = "") -> None:
        """uint8 CHW image to every logger that takes images, and a PNG in the run's plots/."""
        self._save_png(trainer, key.replace("/", "_"), image)
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if "Wandb" in kind:
                logger.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], caption=[caption],
                                 step=trainer.global_step)
            elif "TensorBoard" in kind:
                logger.experiment.add_image(key, image, global_step=trainer.global_step)

    def _log_confusion(self, trainer: Trainer, cm: torch.Tensor, classes: list[str], epoch: int) -> None:
        from callbacks.plots import confusion_figure, to_rgb

        n = cm.shape[0]
        torch.save(cm, self._plots(trainer) / "val_confusion_matrix.pt")  # the counts, for any class count
        (self._plots(trainer) / "val_confusion_matrix.json").write_text(json.dumps({"epoch": epoch, "classes": classes}))
        fig = confusion_figure(cm.numpy(), classes, title=f"validation, epoch {epoch}")
        if n > self.max_confusion_classes:  # a file only: a heatmap this size says little on a dashboard
            self._save_png(trainer, "val_confusion_matrix", torch.from_numpy(to_rgb(fig)).permute(2, 0, 1).contiguous())
            return
        self._log_figure(trainer, "val/confusion_matrix", fig, caption=f"epoch {epoch}: rows true, columns predicted")
        for logger in trainer.loggers:
            if "Wandb" in type(logger).__name__:
                rows = [[classes[i], classes[j], int(cm[i, j])] for i in range(n) for j in range(n) if cm[i, j]]
                logger.log_table(key="val/confusion_table", columns=["label", "prediction", "count"], data=rows,
                                 step=trainer.global_step)

    def _log_wrong(self, trainer: Trainer, pl_module: LightningModule, wrong: list[torch.Tensor],
                   classes: list[str]) -> None:
        score, x, y, pred = wrong
        keep = (score >= 0).cpu()
        if not keep.any():
            return
        images = self._to_uint8(pl_module, x)[keep]
        y, pred, score = y.cpu()[keep], pred.cpu()[keep], score.cpu()[keep]
        captions = [f"{classes[int(a)]} -> {classes[int(b)]} ({float(c):.2f})" for a, b, c in zip(y, pred, score)]
        from callbacks.plots import image_grid_figure, to_rgb

        labels = [f"true {classes[int(a)]}\npred {classes[int(b)]} p={float(c):.2f}" for a, b, c in zip(y, pred, score)]
        fig = image_grid_figure(images.numpy(), labels, title=f"validation, epoch {trainer.current_epoch}: the most "
                                "confidently wrong images (true class, predicted class, its probability)")
        grid = torch.from_numpy(to_rgb(fig)).permute(2, 0, 1).contiguous()
        self._save_png(trainer, "val_most_confident_wrong", grid)
        (self._plots(trainer) / "val_most_confident_wrong.json").write_text(json.dumps(
            {"epoch": trainer.current_epoch, "captions": captions,
             "items": [{"true": classes[int(a)], "predicted": classes[int(b)], "probability": round(float(c), 4)}
                       for a, b, c in zip(y, pred, score)]}))
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if "Wandb" in kind:
                import wandb

                rows = [[wandb.Image(img.permute(1, 2, 0).numpy()), classes[int(a)], classes[int(b)], float(c)]
                        for img, a, b, c in zip(images, y, pred, score)]
                logger.log_table(key="val/most_confident_wrong", columns=["image", "label", "prediction", "confidence"],
                                 data=rows, step=trainer.global_step)
            elif "TensorBoard" in kind:
                logger.experiment.add_image("val/most_confident_wrong", grid, global_step=trainer.global_step)
                logger.experiment.add_text("val/most_confident_wrong", "  \n".join(captions),
                                           global_step=trainer.global_step)
