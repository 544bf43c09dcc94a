"""ImageClassifier: the LightningModule every architecture of the zoo shares.

The network comes from the registry by name (``arch``); this class owns what is common:
the loss (cross-entropy with label smoothing, soft targets under mixup/cutmix), top-1/top-5
per split, optimizer parameter groups (no weight decay on norm weights and biases), per-step
LR schedules, on-device normalisation of uint8 batches with the model's own mean/std,
channels_last, torch.compile, horizontal-flip test-time augmentation and fine-tuning options.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from . import heads, init, optim, registry
from .augment import DeviceAugment
from .optim import Schedule
from .weights import Weights, WeightsError, ema_state_dict, load_weights

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)  # every process builds the model: one line, from rank zero

class BatchWeightedMean(Metric):
    """Epoch mean of a per-batch scalar weighted by batch size: what ``self.log(..., on_epoch=True,
    batch_size=n)`` reduces to, summed across ranks when the metric is computed.

    Why not ``self.log`` at every step: each call costs ~0.5 ms of Python on the training thread
    (Lightning walks the stored result's attributes to move it to the value's device), 2% of a
    25 ms CPU step (benchmarks/overhead.py); an ``update`` here is ~15 us and never waits for the
    device. Why not torchmetrics' ``MeanMetric``: its NaN check reads the value on the host (a sync
    per step), and with ``nan_strategy="disable"`` it drops the weights (torchmetrics 1.9,
    ``aggregation.py``).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, n: int) -> None:  # type: ignore[override]
        self.total += value.detach().float() * n
        self.weight += n

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class ImageClassifier(L.LightningModule):
    """A classifier over any registered architecture.

    Args:
        arch: registry name (``zoo models`` lists them; ``timm/<name>`` for any timm model).
        num_classes: output classes; the CLI fills it from the data.
        arch_args: architecture arguments passed to the builder (e.g. ``{"depth": 3}``).
        weights: checkpoint / state_dict / safetensors / hub id to initialise from (or what
            :func:`zoo.weights.read_weights` read from one; its name is recorded); the
            preprocessing that travels with them (safetensors metadata, config.json, a .ckpt's
            data config) replaces the architecture's (see :meth:`load_pretrained`).
        use_ema: a checkpoint holding EMA weights (the WeightEMA callback) gives them on every
            evaluation/loading path (``weights=``, ``load_from_checkpoint``, ``zoo
            validate/test/predict --ckpt_path``); ``False``: its trained weights. Resuming
            ``fit`` always restores the trained weights.
        optimizer: ``sgd`` (momentum, optional Nesterov) or ``adamw``.
        lr: peak learning rate at ``lr_reference_batch`` images per optimizer step; scaled
            linearly with the real global batch (Goyal et al. 2017), which is read from the
            trainer: per-device batch of the train dataloader x world size x
            accumulate_grad_batches (any DataModule, whatever its ``batch_size`` means).
            ``None`` reference: used as given.
        weight_decay: decay of weights with ndim > 1; norm weights and biases get
            ``norm_weight_decay`` (0: no decay on BN/LN, as ffcv-imagenet and torchvision's recipes).
        schedule, warmup_epochs, warmup_start, peak_epoch, milestones, gamma, min_lr_ratio:
            per-step LR schedule, see :func:`zoo.optim.lr_factor`.
        label_smoothing: cross-entropy label smoothing (Szegedy et al. 2016: 0.1).
        mixup_alpha, cutmix_alpha, random_erasing, random_erasing_mode, auto_augment,
            auto_augment_magnitude: train-time augmentation applied on the device after transfer
            (any backend), batched; ``auto_augment`` names the implementation whose semantics it
            follows: a timm RandAugment string (``rand-m9-mstd0.5-inc1``) or ``ta_wide``
            (torchvision TrivialAugmentWide), see zoo/augment.py.
        channels_last: NHWC memory format for model and inputs (faster convs on tensor cores).
        compile: wrap the network with ``torch.compile``, and compile the device augmentation's
            fixed-shape stages (zoo/augment.py).
        tta_flip: evaluate on the image and its mirror and average the logits (ffcv-imagenet's
            ``lr_tta``).
        freeze_backbone: train only the classifier head (linear probe); backbone norm layers
            stay in eval mode.
        backbone_lr_scale: LR multiplier for everything but the head when fine-tuning.
    """

    def __init__(
        self,
        arch: str = "resnet18",  # torchvision references/classification train.py's default --model
        num_classes: int = 1000,
        arch_args: Optional[dict] = None,
        weights: Optional[str] = None,
        use_ema: bool = True,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,  # at batch 256 (He et al. 2016; Goyal et al. 2017's linear scaling rule)
        lr_reference_batch: Optional[int] = 256,
        momentum: float = 0.9,  # He et al. 2016; torchvision references' --momentum
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),  # Adam's (Kingma & Ba 2015), torch's and timm's default
        weight_decay: float = 1e-4,  # He et al. 2016; torchvision references' --wd 1e-4
        norm_weight_decay: float = 0.0,
        schedule: Schedule = "cosine",  # Loshchilov & Hutter 2017, timm's default --sched
        warmup_epochs: float = 0.0,
        warmup_start: float = 0.0,
        peak_epoch: float = 2.0,
        milestones: Sequence[float] = (30, 60, 80),
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        random_erasing: float = 0.0,
        auto_augment: Optional[str] = None,
        auto_augment_magnitude: int = 9,
        random_erasing_mode: Literal["pixel", "zero"] = "pixel",
        channels_last: bool = False,
        compile: bool = False,
        tta_flip: bool = False,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adamw'")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        source = weights
        if isinstance(weights, Weights):  # read already (zoo.create): record where they came from
            weights = weights.name
        self.save_hyperparameters()  # reads the arguments' current values, ``weights`` as just set
        entry = registry.get_entry(arch)
        self.net = init.build(entry.builder, num_classes=num_classes, arch_args=arch_args)  # arch_args["init"]: zoo/init.py
        data_config = entry.data_config
        if "input_size" in (arch_args or {}):  # fixed-input nets (logreg, mlp) set their own size
            data_config = dataclasses.replace(data_config, input_size=int(arch_args["input_size"]))
        self.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.ones(1, 3, 1, 1), persistent=False)
        self._set_data_config(data_config.as_dict())
        self.weights_report = None  # zoo.weights.LoadReport of the initial weights
        if source:
            self.load_pretrained(source)
        self.augment = DeviceAugment(
            num_classes=num_classes,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            random_erasing=random_erasing,
            auto_augment=auto_augment,
            magnitude=auto_augment_magnitude,
            mean=self.data_config["mean"],
            erase_mode=random_erasing_mode,
            compile=compile,  # the augmentation's fixed-shape stages fused too (zoo/augment.py)
        )
        k5 = min(5, num_classes)
        self.train_loss = BatchWeightedMean()
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=k5, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=k5, average="micro")
        if freeze_backbone:
            head = heads.get_classifier(self.net)
            for p in self.net.parameters():
                p.requires_grad_(False)
            for p in head.parameters():
                p.requires_grad_(True)
            self.train()  # Lightning keeps the module's mode as built: set the probe's now
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._compiled = None
        self._global_batch: Optional[int] = None  # set in configure_optimizers

    def load_pretrained(self, source, *, strict: bool = True):
        """Load ``source`` into ``self.net`` and adopt the preprocessing that travels with it.

        The one way initial weights enter a model: ``ImageClassifier(weights=...)``,
        ``zoo.create(weights=...)``, ``zoo.load`` and ``torch.hub.load`` all end here, so they
        give the same tensors and the same data config. EMA weights per ``hparams.use_ema``.
        Returns the :class:`zoo.weights.LoadReport` (also kept as ``self.weights_report``).
        """
        report = load_weights(
            self.net, source, arch=self.hparams.arch, strict=strict, use_ema=self.hparams.get("use_ema", True)
        )
        if report.data_config is not None:  # a timm/HF tag or an export may differ from the entry
            self._set_data_config(report.data_config.as_dict())
        self.weights_report = report
        _info(f"loaded weights from {report.source}: {report}")
        return report

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The state_dict holds the trained weights: rebuilding from this checkpoint must not
        # re-read the initial weights (the file may have moved, the hub may be offline).
        hp = checkpoint.get("hyper_parameters")
        if hp and hp.get("weights"):
            checkpoint["zoo_init_weights"] = hp["weights"]
            hp["weights"] = None
        if hp:
            # a choice of the loader, not a property of the model: LightningCLI parses a
            # checkpoint's hyper_parameters over the command line, which would undo
            # `zoo validate --ckpt_path X --model.use_ema false`
            hp.pop("use_ema", None)
        checkpoint["zoo_data_config"] = dict(self.data_config)
        if getattr(self, "_schedule", None):  # a resume with another max_epochs says what it does
            checkpoint["zoo_schedule"] = dict(self._schedule)
        if self.class_names:  # launch/ensemble.py compares members' class orders through it
            checkpoint["zoo_classes"] = list(self.class_names)
        # Say plainly which weights this file holds (callbacks' state is already in it).
        found = ema_state_dict(checkpoint)
        checkpoint["zoo_weights"] = {
            "state_dict": "trained weights (fit --ckpt_path resumes from these)",
            "ema": f"callbacks[{found[0]!r}]['ema_state_dict']" if found else None,
            "evaluated_with": "ema (use_ema=False: the trained weights)" if found else "state_dict",
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning copies checkpoint["state_dict"] into the model, both in
        # load_from_checkpoint and in the trainer's restore (--ckpt_path).
        from lightning.pytorch.trainer.states import TrainerFn

        if checkpoint.get("zoo_data_config"):
            self._set_data_config(checkpoint["zoo_data_config"])
        sd = checkpoint.get("state_dict") or {}
        try:
            key = "net." + heads.classifier_prefix(self.net) + ".weight"
        except (ValueError, TypeError):  # a network without a classifier layer
            key = None
        if key in sd and self.net.state_dict().get(key[4:]) is not None:
            have, want = int(sd[key].shape[0]), int(self.net.state_dict()[key[4:]].shape[0])
            if have != want:
                raise WeightsError(
                    f"the checkpoint's classifier has {have} classes but the model/data has {want}: evaluate "
                    f"it on data with {have} classes, or fine-tune it with `zoo fit --model.weights CKPT` "
                    "(which resets the head) instead of --ckpt_path"
                )
        trainer = self._attached_trainer()
        resuming = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if resuming:  # read by configure_optimizers, which runs after this
            self._resumed_schedule = (checkpoint.get("zoo_schedule"), checkpoint.get("global_step"))
        found = ema_state_dict(checkpoint)
        if found is not None and not resuming and self.hparams.get("use_ema", True):
            cb_key, ema = found
            for k, v in ema.items():
                sd["net." + k] = v
            _info(f"evaluating the EMA weights of the checkpoint ({cb_key}); use_ema=False for the trained ones")

    def _set_data_config(self, data_config: dict) -> None:
        self.data_config = dict(data_config)
        self.data_config.setdefault("label_names", None)
        # uint8 -> normalised float on the device: x/255 then (x - mean)/std, folded into one
        # affine map with mean and std in 0..255 units.
        self.pixel_mean.copy_(torch.tensor(data_config["mean"]).view(1, 3, 1, 1) * 255.0)
        self.pixel_std.copy_(torch.tensor(data_config["std"]).view(1, 3, 1, 1) * 255.0)

    # ----------------------------------------------------------------- preprocessing record
    def record_data_preprocessing(self, datamodule=None) -> None:
        """Make :attr:`data_config` what these weights are trained and evaluated with.

        Read from the DataModule of the fit (duck-typed: ``val_resolution``, ``val_crop``,
        ``interpolation``, ``classes`` and ``normalization()``, as ImageNetDataModule offers):
        the evaluation input size and crop ratio, the interpolation, the mean/std (the
        training split's own with ``data.normalize=dataset``) and the class folder names.
        Every checkpoint saves it (``zoo_data_config``), and every loading path reads it back.
        Runs at the start of ``fit`` (``setup`` and ``on_fit_start``, after a resumed
        checkpoint restored the old record); a no-op without a DataModule.
        """
        dm = datamodule
        trainer = self._attached_trainer()
        if dm is None and trainer is not None:
            dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return
        dc = dict(self.data_config)
        for key, attr, cast in (("input_size", "val_resolution", int), ("crop_pct", "val_crop", float),
                                ("interpolation", "interpolation", str)):
            value = getattr(dm, attr, None)
            if value is not None:
                dc[key] = cast(value)
        stats = dm.normalization() if callable(getattr(dm, "normalization", None)) else None
        if stats is not None:
            dc["mean"], dc["std"] = [float(v) for v in stats[0]], [float(v) for v in stats[1]]
        try:
            classes = list(getattr(dm, "classes", None) or [])
        except Exception:  # a folder without classes (predict on photos): nothing to record
            classes = []
        if len(classes) == self.hparams.num_classes:
            dc["label_names"] = [str(c) for c in classes]
        if dc != self.data_config:
            self._set_data_config(dc)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.record_data_preprocessing()

    @property
    def class_names(self) -> Optional[list[str]]:
        """Class names in label order (the class folders of the data it was trained on), or None."""
        names = self.data_config.get("label_names")
        return [str(n) for n in names] if names else None

    @property
    def pretrained_cfg(self) -> dict:
        """The data config in timm's ``pretrained_cfg`` form (``input_size`` as ``(3, H, W)``), for
        ``timm.data.resolve_data_config(pretrained_cfg=model.pretrained_cfg)``."""
        dc = self.data_config
        size = int(dc["input_size"])
        return {
            "input_size": (3, size, size), "crop_pct": float(dc["crop_pct"]), "crop_mode": "center",
            "interpolation": str(dc["interpolation"]), "mean": tuple(dc["mean"]), "std": tuple(dc["std"]),
            "num_classes": int(self.hparams.num_classes), "label_names": self.class_names,
        }

    def eval_transform(self, **overrides):
        """The evaluation transform these weights expect: a PIL image or a uint8 ``(3, H, W)`` tensor
        -> resize the short side to ``floor(input_size / crop_pct)``, center-crop ``input_size``,
        scale to [0, 1], normalise with mean/std -> float ``(3, input_size, input_size)``.

        ``overrides``: data config keys (``input_size=64``, ``crop_pct=1.0``, ...) to evaluate
        otherwise than recorded; one line says which differ from the record.

        timm's own eval transform (``resolve_data_config`` + ``create_transform``) built from
        :attr:`pretrained_cfg`; its PIL-to-tensor step is replaced by torchvision's ``ToImage`` +
        ``ToDtype(scale=True)`` so that uint8 tensors are scaled as PIL images are.
        ``model(torch.stack([tf(img) for img in images]))`` gives the logits.
        """
        from timm.data import create_transform, resolve_data_config
        from torchvision.transforms import v2

        pretrained_cfg = self.pretrained_cfg
        unknown = set(overrides) - {"input_size", "crop_pct", "interpolation", "mean", "std"}
        if unknown:
            raise ValueError(f"eval_transform overrides {sorted(unknown)}: use input_size, crop_pct, interpolation, mean, std")
        differ = [f"{k}={v}" for k, v in overrides.items() if v is not None and v != self.data_config.get(k)
                  and not (k in ("mean", "std") and list(v) == list(self.data_config[k]))]
        for k, v in overrides.items():
            if v is not None:
                pretrained_cfg[k] = (3, int(v), int(v)) if k == "input_size" else tuple(v) if k in ("mean", "std") else v
        if differ:
            _info(f"eval_transform: {', '.join(differ)} instead of the recorded {', '.join(f'{k}={self.data_config.get(k)}' for k in (d.split('=')[0] for d in differ))}")
        cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
        tf = create_transform(**cfg, is_training=False)
        to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        steps = [to_float if type(t).__name__ in ("MaybeToTensor", "ToTensor") else t for t in tf.transforms]
        if not any(t is to_float for t in steps):
            raise RuntimeError(f"timm's eval transform has no ToTensor step to replace: {tf}")
        return type(tf)(steps)

    @torch.no_grad()
    def predict_classes(self, images, k: int = 1) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(class name, probability)`` per image, for PIL images or uint8 ``(3, H, W)``
        tensors of any size (a list, or one image), preprocessed by :meth:`eval_transform`.
        Class names are the recorded ones (:attr:`class_names`), else the class index as a string."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        tf = self.eval_transform()
        x = torch.stack([tf(img) for img in images]).to(self.pixel_mean.device)
        was_training = self.training
        self.eval()
        try:
            probs = self._eval_logits(x).float().softmax(-1)
        finally:
            self.train(was_training)
        names = self.class_names or [str(i) for i in range(probs.shape[1])]
        top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[(names[i], float(p)) for p, i in zip(ps.tolist(), ix.tolist())] for ps, ix in zip(top_p, top_i)]

    # ----------------------------------------------------------------- forward path
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised float batch (use :meth:`preprocess` on uint8 images)."""
        if self.hparams.compile and self._compiled is None:
            # Not assigned as a submodule: its parameters would appear twice in state_dict
            # under `_orig_mod.` keys.
            object.__setattr__(self, "_compiled", torch.compile(self.net))
        net = self._compiled if self._compiled is not None else self.net
        return net(x)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) NCHW images -> normalised float, channels_last if set."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}; "
                "convert HWC arrays with .permute(0, 3, 1, 2)"
            )
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        if isinstance(batch, torch.Tensor):  # predict on bare images
            return self.preprocess(batch) if batch.dtype == torch.uint8 else batch
        images, labels = batch[0], batch[1]
        labels = labels.reshape(-1).long()
        trainer = self._attached_trainer()
        if trainer is not None and trainer.training and images.dtype == torch.uint8:
            images = self.augment.pre_normalise(images)
        if images.dtype == torch.uint8:
            images = self.preprocess(images)
        return images, labels

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_backbone:
            # Linear probe: backbone BN keeps its running statistics (eval mode).
            self.net.eval()
            heads.get_classifier(self.net).train()
        return self

    # ----------------------------------------------------------------- steps
    def on_fit_start(self) -> None:
        self.record_data_preprocessing()  # again: a resumed checkpoint restored its own record
        self._bar_loss = None

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        x, targets = self.augment.post_normalise(x, y)
        logits = self(x)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        self._log_train_loss(loss, len(y))
        self._bar_loss = loss.detach()
        if targets.ndim == 1:  # hard labels: accuracy is meaningful
            # update() only (calling the metric also computes a batch value, unused with
            # on_step=False); Lightning keeps a reference to the metric and computes it at the epoch
            # end, so it is logged once per epoch: each self.log costs ~0.5 ms of Python per step on
            # a CPU (benchmarks/overhead.py).
            self.train_acc1.update(logits.detach(), y)
            if not self._train_acc1_logged:
                self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
                self._train_acc1_logged = True
        return loss

    def _log_train_loss(self, loss: torch.Tensor, n: int) -> None:
        """``train/loss_step`` on the steps the logger writes, ``train/loss_epoch`` (and
        ``train/loss`` in ``callback_metrics``) once per epoch: the keys and values
        ``self.log("train/loss", on_step=True, on_epoch=True)`` gives, without its ~0.5 ms per step.

        The epoch mean is a metric object Lightning computes at the epoch's end
        (:class:`BatchWeightedMean`); the step value is logged only when the logger will write it
        (:func:`_logger_writes_this_step`, as Lightning's own ``LearningRateMonitor`` asks). Not
        ``prog_bar``: see :meth:`progress_bar_values`."""
        self.train_loss.update(loss, n)
        if not self._train_loss_logged:
            self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, logger=False)
            self._train_loss_logged = True
        trainer = self._attached_trainer()
        if trainer is None or _logger_writes_this_step(trainer):
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)

    def progress_bar_values(self) -> dict[str, str]:
        """What the progress bar adds when it redraws (callbacks/progress.py reads it): the last
        training loss, while training.

        A metric logged with ``prog_bar=True`` is turned into a Python number by Lightning at
        every batch end: a host-device sync per step, even with the bar off (benchmarks/gpu.py's
        sync audit found it). The bar redraws every ``refresh_rate`` batches at most, so the loss
        is read there.
        """
        trainer = self._attached_trainer()
        loss = getattr(self, "_bar_loss", None)
        if loss is None or trainer is None or not trainer.training:
            return {}
        return {"loss": f"{float(loss):.3f}"}

    def _attached_trainer(self):
        """The Trainer running this module, None outside one (``self.trainer`` raises there)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        if self.hparams.tta_flip:
            logits = (logits + self(torch.flip(x, dims=[3]))) / 2
        return logits

    def _eval_step(self, batch, split: str):
        x, y = batch
        logits = self._eval_logits(x)
        loss = F.cross_entropy(logits, y)
        acc1, acc5 = getattr(self, f"{split}_acc1"), getattr(self, f"{split}_acc5")
        acc1(logits, y)
        acc5(logits, y)
        self.log(f"{split}/loss", loss, sync_dist=True, prog_bar=split == "val")
        self.log(f"{split}/acc1", acc1, prog_bar=True)
        self.log(f"{split}/acc5", acc5)
        # the logits go to the callbacks' on_*_batch_end (the Dashboard's confusion matrix and
        # mistakes reuse them instead of a second forward pass)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch, batch_idx: int):
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int):
        return self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self._eval_logits(x).softmax(dim=-1)

    # Throughput (per device, global, MFU) is Lightning's ThroughputMonitor, added by the CLI
    # (callbacks/dashboard.py): it times training steps only, not validation.
    _train_acc1_logged = _train_loss_logged = False

    def on_train_epoch_start(self) -> None:
        self._train_acc1_logged = self._train_loss_logged = False
        if self.hparams.freeze_backbone:
            self.train()

    # ----------------------------------------------------------------- optimisation
    def global_batch_size(self) -> Optional[int]:
        """Images per optimizer step over all processes (:func:`zoo.optim.global_batch_size`), read
        from the trainer; kept once ``configure_optimizers`` has run (the loader may be gone after fit)."""
        if self._global_batch is not None:
            return self._global_batch
        trainer = self._attached_trainer()
        return optim.global_batch_size(trainer) if trainer is not None else None

    def effective_lr(self) -> float:
        """``lr x global batch / lr_reference_batch`` (Goyal et al. 2017); ``lr`` when no reference."""
        lr, ref = self.hparams.lr, self.hparams.lr_reference_batch
        gb = self.global_batch_size() if ref else None
        if ref and gb:
            return lr * gb / ref
        if ref and self._attached_trainer() is not None:
            rank_zero_warn(
                f"cannot read the batch size of the train dataloader: lr {lr} is used as given, not scaled "
                f"from lr_reference_batch={ref}; set model.lr_reference_batch=null to say so"
            )
        return lr

    def param_groups(self, lr: float) -> list[dict]:
        """Decay / no-decay x backbone / head groups (:func:`zoo.optim.param_groups`)."""
        hp = self.hparams
        return optim.param_groups(self.net, lr, weight_decay=hp.weight_decay, norm_weight_decay=hp.norm_weight_decay,
                                  backbone_lr_scale=hp.backbone_lr_scale)

    def configure_optimizers(self):
        hp = self.hparams
        # first: it sets up the train dataloader, whose batch size the LR scaling reads
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        self._global_batch = None
        self._global_batch = self.global_batch_size()  # kept: the loader may be gone after fit
        lr = self.effective_lr()
        gb = self._global_batch
        groups = self.param_groups(lr)
        frozen = sum(p.numel() for p in self.net.parameters() if not p.requires_grad)
        _info(
            f"optimizer {hp.optimizer}: peak lr {lr:.4g}"
            + (f" (= {hp.lr} x {gb}/{hp.lr_reference_batch} global batch)" if hp.lr_reference_batch and gb else "")
            + optim.describe_param_groups(groups, frozen)
        )
        opt = optim.build_optimizer(hp.optimizer, groups, lr, momentum=hp.momentum, nesterov=hp.nesterov, betas=hp.betas)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = total / max_epochs
        if hp.schedule == "cyclic" and hp.peak_epoch >= max_epochs:
            rank_zero_warn(
                f"peak_epoch {hp.peak_epoch} >= max_epochs {max_epochs}: the cyclic LR never comes down"
            )
        fn = optim.schedule_from_hparams(hp, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
        self._schedule = {"max_epochs": max_epochs, "steps_per_epoch": steps_per_epoch}
        old, step = getattr(self, "_resumed_schedule", (None, None))
        self._resumed_schedule = (None, None)
        note = optim.schedule_change_note(hp, old, step, max_epochs, lr, fn)
        if note:
            _info(note)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}


def _logger_writes_this_step(trainer) -> bool:
    """Whether the loggers write step values at the optimizer step this batch makes: Lightning's
    ``LoggerConnector.should_update_logs`` during fit, from public attributes (every
    ``log_every_n_steps`` optimizer steps, counting this one, when the run stops, and under
    ``fast_dev_run``). ``global_step`` counts what Lightning's ``_batches_that_stepped`` counts
    there with one optimizer under automatic optimization, ImageClassifier's case."""
    if trainer.fast_dev_run:
        return True
    every = trainer.log_every_n_steps
    return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)
