"""WeightEMA: an exponential moving average of the network's weights.

``ema = decay * ema + (1 - decay) * w`` every ``every_n_steps`` optimizer steps, over all
parameters and floating-point buffers (BN running statistics included). Validation can run
on the EMA weights; the EMA is saved in the checkpoint (``checkpoint["callbacks"]["WeightEMA"]
["ema_state_dict"]``, keys of ``pl_module.net``), which ``zoo.load`` picks up.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class WeightEMA(L.Callback):
    """Args:
    decay: per-update decay. ConvNeXt trains with 0.9999 per step (Liu et al. 2022,
        model_ema_decay); torchvision's recipe uses 0.99998 every 32 steps.
    every_n_steps: update interval in optimizer steps (fewer updates, less overhead).
    evaluate_with_ema: run validation/test on the EMA weights (swapped in and out).
    """

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1, evaluate_with_ema: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA decay must be in (0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"WeightEMA every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.evaluate_with_ema = evaluate_with_ema
        self.ema: Optional[dict[str, torch.Tensor]] = None
        self.num_updates = 0
        self._loaded: Optional[dict[str, torch.Tensor]] = None
        self._backup: Optional[dict[str, torch.Tensor]] = None

    @staticmethod
    def _tracked(pl_module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in pl_module.net.state_dict().items() if v.dtype.is_floating_point}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._init_or_resume(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        # Strategies that restore checkpoints after setup (e.g. DeepSpeed) do it after on_fit_start.
        self._init_or_resume(pl_module)

    def _init_or_resume(self, pl_module) -> None:
        current = self._tracked(pl_module)
        if self._loaded is not None:  # resume: applied lazily once the module exists
            missing = set(current) - set(self._loaded)
            if missing:
                raise ValueError(
                    f"WeightEMA state in the checkpoint lacks {len(missing)} tensors of this model "
                    f"(e.g. {sorted(missing)[:3]}); was it saved from another architecture?"
                )
            self.ema = {k: self._loaded[k].to(v.device, v.dtype) for k, v in current.items()}
            self._loaded = None
            rank_zero_info(f"WeightEMA: resumed after {self.num_updates} updates")
        elif self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in current.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema is None or trainer.global_step % self.every_n_steps:
            return
        current = self._tracked(pl_module)
        ema_vals = list(self.ema.values())
        cur_vals = [current[k] for k in self.ema]
        torch._foreach_lerp_(ema_vals, cur_vals, 1.0 - self.decay)
        self.num_updates += 1

    def _swap_in(self, pl_module) -> None:
        if not self.evaluate_with_ema or self.ema is None or self._backup is not None:
            return
        sd = pl_module.net.state_dict()
        self._backup = {k: sd[k].detach().clone() for k in self.ema}
        for k, v in self.ema.items():
            sd[k].copy_(v)

    def _swap_out(self, pl_module) -> None:
        if self._backup is None:
            return
        sd = pl_module.net.state_dict()
        for k, v in self._backup.items():
            sd[k].copy_(v)
        self._backup = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # A checkpoint written during validation (ModelCheckpoint on val/acc1) must hold the
        # trained weights in state_dict, not the EMA ones swapped in for evaluation.
        if self._backup is not None:
            sd = checkpoint["state_dict"]
            for k, v in self._backup.items():
                sd["net." + k] = v.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "ema_state_dict": {k: v.detach().cpu() for k, v in (self.ema or {}).items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._loaded = state_dict.get("ema_state_dict") or None
