"""NonFiniteLossCheck: stop a fit whose training loss became NaN or inf, naming the step, the
learning rate and the first layer that went non-finite.

A callback, as Lightning's ``SpikeDetection`` is (and not its ``Trainer(detect_anomaly=True)``,
which re-runs autograd in anomaly mode at every step). ``zoo fit`` adds it by default
(launch/zoo_cli.py); in plain Python pass it: ``L.Trainer(callbacks=[NonFiniteLossCheck()])``.

Why every ``check_every_n_steps`` batches and not at each: a diverged loss stays non-finite (its
NaN/inf reaches the weights), so remembering it on the device (``torch.where``, no sync) and
reading the flag every 25 batches stops the run within that many steps while the host waits for
the device once per check, not at every step (benchmarks/overhead.py measures the per-step sync).
The flag is also read at the end of each training epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import lightning as L
import torch
from torch import nn


class NonFiniteLossCheck(L.Callback):
    """Raise ``FloatingPointError`` once a non-finite training loss was seen (checked every
    ``check_every_n_steps`` batches and at each epoch's end): ``training loss became non-finite
    (NaN or inf) at step S, lr X; first non-finite: <layer>; lower the learning rate or enable
    warmup``. The CLI answers it with that one line and exit code 2."""

    def __init__(self, check_every_n_steps: int = 25) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._flag: Optional[torch.Tensor] = None  # any non-finite loss so far (on the device)
        self._first: Optional[torch.Tensor] = None  # the global step of the first one, -1 if none
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to (a Python int)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach())
            if self._flag is None:
                self._first = torch.where(bad, self._step, -1)
                self._flag = bad
            else:  # torch.where with a Python int: no host-device sync
                self._first = torch.where(bad & ~self._flag, self._step, self._first)
                self._flag = self._flag | bad
        if batch_idx % self.check_every_n_steps == 0:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            self._raise_if_seen(trainer, pl_module, x if isinstance(x, torch.Tensor) else None)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._raise_if_seen(trainer, pl_module, None)

    def _raise_if_seen(self, trainer, pl_module, x: Optional[torch.Tensor]) -> None:
        if self._flag is None or not bool(self._flag):
            return
        step = int(self._first)
        self._flag = self._first = None
        net = getattr(pl_module, "net", pl_module)
        raise FloatingPointError(
            f"training loss became non-finite (NaN or inf) at step {step}{lr_at(trainer, step)}; first non-finite: "
            f"{first_nonfinite(net, x)}; lower the learning rate or enable warmup (--model.warmup_epochs)"
        )


def lr_at(trainer, step: int) -> str:
    """``, lr X``: the largest learning rate of ``step`` (a LambdaLR: base LR x factor(step)), or ''."""
    if not trainer.optimizers:
        return ""
    groups = trainer.optimizers[0].param_groups
    configs = trainer.lr_scheduler_configs
    sched = configs[0].scheduler if configs else None
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        lrs = [g.get("initial_lr", g["lr"]) * fn(step) for g, fn in zip(groups, sched.lr_lambdas)]
    else:
        lrs = [g["lr"] for g in groups]
    return f", lr {max(lrs):.3g}"


@torch.no_grad()
def first_nonfinite(net: nn.Module, x: Optional[torch.Tensor] = None) -> str:
    """The first module of ``net`` (in registration order, which follows the forward pass in the
    zoo's networks) whose parameters or buffers (BN running statistics) are non-finite; else, with
    a batch, the first module whose output is (forward hooks, set only here, once)."""
    for name, module in net.named_modules():
        for kind, tensors in (("parameter", module.named_parameters(recurse=False)),
                              ("buffer", module.named_buffers(recurse=False))):
            for tname, t in tensors:
                if t.is_floating_point() and not torch.isfinite(t).all():
                    return f"{kind} {name}.{tname} ({type(module).__name__})".replace("net..", "")
    if x is None:
        return "no parameter or buffer (the loss or its input)"
    if not torch.isfinite(x).all():
        return "the input batch"
    found: list[str] = []

    def hook(name):
        def fn(module, args, out):
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(f"output of {name} ({type(module).__name__})")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n]
    try:
        net(x)  # in the training mode that failed; the run stops after this anyway
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "no layer output (the loss: check labels and label smoothing)"
