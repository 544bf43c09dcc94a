"""WeightEMA: an exponential moving average of the network's weights, once per optimizer step.

``ema = d * ema + (1 - d) * w`` after every ``every_n_steps``-th optimizer step, over all
parameters and floating-point buffers (BN running statistics included) of ``pl_module.net``.
Micro-batches of gradient accumulation do not count: with ``accumulate_grad_batches: 4`` the
EMA moves once per 4 batches (Lightning's ``WeightAveraging`` guard,
``trainer.global_step > last update step``).

Validation runs on the trained weights (``val/acc1``) as usual; then this callback evaluates
the EMA weights over the same val dataloaders and logs ``val_ema/loss|acc1|acc5`` (timm's
train.py validates both). ``run.callbacks.best_checkpoint.monitor`` in a recipe says which one picks the best checkpoint.
Test likewise logs ``test_ema/*``.

Checkpoint format (the loading contract of ``zoo.load``/``zoo.weights``):
``checkpoint["callbacks"]["WeightEMA"]["ema_state_dict"]`` holds the EMA, keyed like
``pl_module.net.state_dict()`` (float tensors, on the CPU); ``checkpoint["state_dict"]`` always
holds the trained weights; ``checkpoint["zoo_weights"]`` (written by ImageClassifier) says so.

Why our own callback and not Lightning 2.6's ``EMAWeightAveraging`` (read from
lightning/pytorch/callbacks/weight_averaging.py): (1) it writes the *average* into
``checkpoint["state_dict"]`` and the trained weights into ``current_model_state``, which
clashes with the loading contract above and with resuming from ``state_dict``; (2) it swaps
the average in for validation, so only one of val/acc1 and the EMA accuracy is ever measured;
(3) ``on_train_end`` copies the average over the trained weights; (4) it deep-copies the whole
LightningModule (metrics, augmentation) and creates that copy in ``setup()``, which the
Trainer calls before ``strategy.setup()`` moves the model to the accelerator
(trainer.py ``_run``: ``_call_setup_hook`` then ``strategy.setup``): unless ``device=`` is
passed, the average stays on the CPU and ``AveragedModel.update_parameters`` copies every
parameter across PCIe at each step (``p_model.detach().to(p_averaged.device)``). This
callback creates the EMA in ``on_fit_start``, after the move, on the parameters' device; it
also offers the decay warm-up and torchvision's warm-up reset, which the recipes need.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from ._batches import all_reduce, as_list, iterate, precision_context

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)


class WeightEMA(L.Callback):
    """Args:
    decay: decay per update (per ``every_n_steps`` optimizer steps). ConvNeXt: 0.9999 per step
        (Liu et al. 2022, ``--model_ema_decay``); torchvision's recipe 0.99998 every 32 steps.
    every_n_steps: update after every n-th optimizer step (fewer updates, less overhead).
    warmup: ramp the decay up at the start (``None``: constant). ``"timm"``: timm
        ModelEmaV3.get_decay, ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)`` with
        t the number of earlier updates; ``"tf"``: TensorFlow's ExponentialMovingAverage with
        num_updates, ``min(decay, (1 + t) / (10 + t))``. Both give 0 (a copy) at t = 0.
    warmup_gamma, warmup_power: timm's defaults 1.0 and 2/3 (ModelEmaV3).
    reset_epochs: while the epoch is below this, every update sets the EMA to the weights
        (torchvision references/classification/train.py resets the EMA during the LR warm-up:
        ``if epoch < args.lr_warmup_epochs: model_ema.n_averaged.fill_(0)``).
    evaluate_with_ema: also evaluate the EMA weights after validation and test
        (``val_ema/*``, ``test_ema/*``).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        every_n_steps: int = 1,
        warmup: Optional[Literal["timm", "tf"]] = None,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        reset_epochs: float = 0.0,
        evaluate_with_ema: bool = True,
    ) -> None:
        if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise ValueError(f"WeightEMA decay must be in (0, 1), got {decay}; 0.9999 is a common value")
        if every_n_steps < 1:
            raise ValueError(f"WeightEMA every_n_steps must be >= 1, got {every_n_steps}")
        if warmup not in (None, "timm", "tf"):
            raise ValueError(f"WeightEMA warmup must be None, 'timm' or 'tf', got {warmup!r}")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(f"WeightEMA warmup_gamma and warmup_power must be > 0, got {warmup_gamma}, {warmup_power}")
        self.decay = float(decay)
        self.every_n_steps = every_n_steps
        self.warmup = warmup
        self.warmup_gamma, self.warmup_power = warmup_gamma, warmup_power
        self.reset_epochs = reset_epochs
        self.evaluate_with_ema = evaluate_with_ema
        self.ema: Optional[dict[str, torch.Tensor]] = None
        self.num_updates = 0
        self.last_step = 0  # trainer.global_step of the last update check
        self._loaded: Optional[dict[str, torch.Tensor]] = None
        self._backup: Optional[dict[str, torch.Tensor]] = None
        self._where: Optional[list[tuple[dict, str]]] = None  # _locate

    # ------------------------------------------------------------------ the average
    @staticmethod
    def _tracked(pl_module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in pl_module.net.state_dict().items() if v.dtype.is_floating_point}

    def _locate(self, pl_module) -> None:
        """Remember where each EMA'd tensor lives: (the module's ``_parameters`` or ``_buffers``
        dict, its name), in ``self.ema``'s order. ``update`` then reads the live tensors from
        those dicts instead of walking ``state_dict()`` each step (a walk costs about 100x the
        lookup's host time, per update: benchmarks/ema_lookup.py, docs/benchmarks.md, "EMA
        update"; the lookup is a list comprehension). Reading the dict
        each time follows what ``.to()`` or ``load_state_dict`` put there. When the module tree
        does not match ``state_dict()`` (a custom state-dict hook renames or adds entries), the
        walk stays.
        """
        where: dict[str, tuple[dict, str]] = {}
        for prefix, m in pl_module.net.named_modules(remove_duplicate=False):
            dot = prefix + "." if prefix else ""
            for name, p in m._parameters.items():
                if p is not None:
                    where[dot + name] = (m._parameters, name)
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent_buffers_set:
                    where[dot + name] = (m._buffers, name)
        current = self._tracked(pl_module)
        same = set(current) == set(self.ema) and all(
            k in where and where[k][0][where[k][1]].data_ptr() == v.data_ptr() for k, v in current.items())
        self._where = [where[k] for k in self.ema] if same else None

    def _current(self, pl_module) -> list[torch.Tensor]:
        """The live tensors the EMA follows, in ``self.ema``'s order."""
        if self._where is not None:
            return [d[name] for d, name in self._where]
        current = self._tracked(pl_module)
        return [current[k] for k in self.ema]

    def decay_at(self, t: int) -> float:
        """Decay of the update that follows ``t`` earlier updates."""
        if self.warmup == "timm":
            return min(self.decay, 1.0 - (1.0 + t / self.warmup_gamma) ** -self.warmup_power)
        if self.warmup == "tf":
            return min(self.decay, (1.0 + t) / (10.0 + t))
        return self.decay

    def on_fit_start(self, trainer, pl_module) -> None:
        self._init_or_resume(pl_module)
        self._warn_if_too_short(trainer)

    def initial_weight_at_end(self, trainer) -> Optional[float]:
        """Share of the EMA at the end of this fit still held by the weights it started from
        (at its start, or at the last warm-up reset); None when the fit's length is unknown.
        A constant decay d over n updates leaves d**n; both warm-ups start with decay 0."""
        if self.warmup is not None:
            return 0.0
        try:
            steps = float(trainer.estimated_stepping_batches)
        except Exception:  # no train loader length (an iterable dataset without __len__)
            return None
        if not math.isfinite(steps):
            return None
        first = trainer.global_step
        batches = trainer.num_training_batches
        if self.reset_epochs > 0 and batches and math.isfinite(batches):  # the last reset
            per_epoch = max(int(batches) // trainer.accumulate_grad_batches, 1)
            first = max(first, math.ceil(self.reset_epochs * per_epoch))
        updates = max(int(steps) - first, 0) // self.every_n_steps
        return self.decay ** updates

    def _warn_if_too_short(self, trainer) -> None:
        share = self.initial_weight_at_end(trainer)
        # above one half the EMA mostly shows the starting weights: with decay 0.9999 (10,000-update
        # horizon) on the demo's 8 x 46 = 368 steps, 0.9999**368 = 0.96 and val_ema/acc1 stays near chance
        if share is not None and share > 0.5:
            rank_zero_warn(
                f"WeightEMA: decay {self.decay:g} averages over ~{1 / (1 - self.decay):,.0f} updates but this fit makes "
                f"{math.log(share) / math.log(self.decay):,.0f}: at its end the starting weights still hold "
                f"{100 * share:.0f}% of the EMA (val_ema/* near its starting accuracy); lower the decay, set warmup: timm, "
                "or train longer"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # Strategies that restore checkpoints after setup (e.g. DeepSpeed) do it after on_fit_start.
        self._init_or_resume(pl_module)

    def _init_or_resume(self, pl_module) -> None:
        current = self._tracked(pl_module)
        if self._loaded is not None:  # resume: applied lazily once the module is on its device
            missing = set(current) - set(self._loaded)
            if missing:
                raise ValueError(
                    f"WeightEMA state in the checkpoint lacks {len(missing)} tensors of this model "
                    f"(e.g. {sorted(missing)[:3]}); was it saved from another architecture?"
                )
            self.ema = {k: self._loaded[k].to(v.device, v.dtype) for k, v in current.items()}
            self._loaded = None
            _info(f"WeightEMA: resumed after {self.num_updates} updates (step {self.last_step})")
        elif self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in current.items()}
        self._locate(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps so far: unchanged between micro-batches
        if self.ema is None or step <= self.last_step:
            return
        self.last_step = step
        if step % self.every_n_steps:
            return
        self.update(pl_module, reset=trainer.current_epoch < self.reset_epochs)

    @torch.no_grad()
    def update(self, pl_module, reset: bool = False) -> None:
        ema_vals, cur_vals = list(self.ema.values()), self._current(pl_module)
        d = 0.0 if reset else self.decay_at(self.num_updates)
        if d == 0.0:
            torch._foreach_copy_(ema_vals, cur_vals)
        else:
            torch._foreach_lerp_(ema_vals, cur_vals, 1.0 - d)
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping
    @contextlib.contextmanager
    def swapped(self, pl_module):
        """The EMA weights in ``pl_module.net`` inside the block, the trained ones after.

        What the block does to the net's tensors is written back into the EMA (PreciseBN
        recomputes the EMA's BN statistics this way).
        """
        if self.ema is None or self._backup is not None:
            yield
            return
        sd = pl_module.net.state_dict()
        self._backup = {k: sd[k].detach().clone() for k in self.ema}
        try:
            for k, v in self.ema.items():
                sd[k].copy_(v)
            yield
            for k, v in self.ema.items():
                v.copy_(sd[k])
        finally:
            for k, v in self._backup.items():
                sd[k].copy_(v)
            self._backup = None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer, pl_module, split: str) -> Optional[dict[str, float]]:
        """Loss, top-1, top-5 of the EMA weights over the split's dataloaders (all ranks)."""
        if split == "val":
            loaders, limits = as_list(trainer.val_dataloaders), trainer.num_val_batches
        else:
            loaders, limits = as_list(trainer.test_dataloaders), trainer.num_test_batches
        if not loaders or self.ema is None:
            return None
        limits = list(limits) + [math.inf] * len(loaders)
        # [loss sum, top-1 hits, top-5 hits, count]: one all-reduce at the end, no per-batch sync
        sums = torch.zeros(4, device=pl_module.device, dtype=torch.float32)
        was_training = pl_module.training
        pl_module.eval()
        forward = getattr(pl_module, "_eval_logits", pl_module)
        with self.swapped(pl_module), precision_context(trainer):
            for idx, loader in enumerate(loaders):
                limit = None if limits[idx] == math.inf else limits[idx]
                for x, y in iterate(loader, pl_module, max_batches=limit, dataloader_idx=idx):
                    logits = forward(x).float()
                    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                    hit = top == y[:, None]
                    sums += torch.stack([
                        F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum().float(),
                        hit.any(-1).sum().float(), torch.full((), float(y.numel()), device=sums.device),
                    ])
        pl_module.train(was_training)
        all_reduce(sums, "sum")
        n = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / n, "acc1": float(sums[1]) / n, "acc5": float(sums[2]) / n}

    def _log(self, trainer, pl_module, split: str) -> None:
        if not self.evaluate_with_ema or trainer.sanity_checking:
            return
        res = self.evaluate(trainer, pl_module, split)
        if res is None:
            return
        for name, value in res.items():
            # already summed over ranks: no second sync
            pl_module.log(f"{split}_ema/{name}", value, prog_bar=name == "acc1", sync_dist=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._backup is not None:  # saved from inside a swap: state_dict keeps the trained weights
            sd = checkpoint["state_dict"]
            for k, v in self._backup.items():
                sd["net." + k] = v.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "every_n_steps": self.every_n_steps,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "ema_state_dict": {k: v.detach().cpu() for k, v in (self.ema or {}).items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.last_step = int(state_dict.get("last_step", 0))
        self._loaded = state_dict.get("ema_state_dict") or None
        self.ema = None
