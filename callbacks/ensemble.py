"""Ensembles: combiners, calibration metrics, stacked inference and the ``Ensemble`` callback.

- Combiners: ``mean_prob`` (average of the members' softmax probabilities, the default, as in
  Lakshminarayanan et al. 2017 deep ensembles), ``mean_logit`` (softmax of the averaged logits),
  ``vote`` (majority vote of the members' top-1). Vote ties are broken deterministically: among
  the classes with the most votes, the one with the highest mean member probability; if that
  ties too, the lowest class index (``torch.argmax`` returns the first maximum). The vote's
  "probabilities" are the vote shares (so NLL is often infinite: reported as such).
- Metrics per member, best member and ensemble: top-1, top-5, NLL, Brier score (sum over
  classes of squared error, averaged over images), ECE (15 bins, Guo et al. 2017;
  torchmetrics' calibration error of the predicted class's confidence and its correctness).
- On a GPU, members of the same architecture run *stacked*: ``torch.func.stack_module_state``
  + ``functional_call`` + ``vmap`` (every member in eval mode), one batched call instead of one
  per member; on a CPU only MLPs do (convnets stacked measured slower there); the rest loop
  (:class:`MemberRunner`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

Combine = Literal["mean_prob", "mean_logit", "vote"]
COMBINERS = ("mean_prob", "mean_logit", "vote")
ECE_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks"


def combine(logits: torch.Tensor, how: Combine = "mean_prob") -> torch.Tensor:
    """(members, N, C) logits -> (N, C) ensemble probabilities (vote: vote shares)."""
    if how == "mean_prob":
        return logits.float().softmax(-1).mean(0)
    if how == "mean_logit":
        return logits.float().mean(0).softmax(-1)
    if how == "vote":
        m, _, c = logits.shape
        return F.one_hot(logits.argmax(-1), c).float().sum(0) / m
    raise ValueError(f"unknown combiner {how!r}; choose one of {', '.join(COMBINERS)}")


def ranking_scores(logits: torch.Tensor, how: Combine = "mean_prob") -> torch.Tensor:
    """(N, C) scores whose argmax/top-k is the ensemble's prediction (vote tie-break built in)."""
    probs = combine(logits, how)
    if how != "vote":
        return probs
    m = logits.shape[0]
    # votes are multiples of 1/m: adding mean probability / (2 m) (< half a vote) orders tied
    # classes by mean probability and never overturns a vote difference
    return probs + logits.float().softmax(-1).mean(0) / (2 * m)


def metrics(probs: torch.Tensor, y: torch.Tensor, scores: Optional[torch.Tensor] = None) -> dict[str, float]:
    """top-1, top-5, NLL, Brier, ECE of (N, C) probabilities; ``scores`` rank the classes."""
    scores = probs if scores is None else scores
    n, c = probs.shape
    k = min(5, c)
    top = scores.topk(k, -1).indices
    hit = top == y[:, None]
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    nll = float(-(p_true.clamp_min(0).log()).mean())
    brier = float(((probs - F.one_hot(y, c).float()) ** 2).sum(-1).mean())
    # confidence = the probability (vote: the vote share) of the predicted class, top-1 of scores
    pred = top[:, 0]
    conf = probs.gather(1, pred[:, None]).squeeze(1)
    ece = expected_calibration_error(conf, pred == y)
    return {"top1": float(hit[:, 0].float().mean()), "top5": float(hit.any(-1).float().mean()),
            "nll": nll, "brier": brier, "ece": ece}


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al. 2017) of the predicted class's confidence and its correctness.

    torchmetrics' ``binary_calibration_error`` on (confidence, correct): the same equal-width
    bins and L1 norm as its ``multiclass_calibration_error``, but fed the confidences directly.
    The multiclass form takes a probability matrix and its own argmax as the prediction, and
    softmaxes the whole matrix when any entry lies outside [0, 1] (it reads it as logits), so
    it can neither take the vote's tie-break nor a vote share nudged above 1 to impose it.
    """
    from torchmetrics.functional.classification import binary_calibration_error

    conf = conf.float().clamp(0.0, 1.0)  # rounding must never switch torchmetrics to its logit path
    return float(binary_calibration_error(conf, correct.long(), n_bins=n_bins, norm="l1"))


def arch_key(model) -> tuple:
    hp = getattr(model, "hparams", {}) or {}
    return (hp.get("arch"), repr(sorted((hp.get("arch_args") or {}).items())))


def fold_bn(net: nn.Module) -> nn.Module:
    """Eval-mode conv + BN folded into one conv (torch.fx ``optimization.fuse``); the net
    itself when it cannot be traced. Under vmap an unfolded BN with per-member statistics
    becomes separate normalise, multiply and add kernels (46% of the stacked time, profiled)."""
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(net.eval())
    except Exception:
        return net


def _stack_state(nets: Sequence[nn.Module]) -> tuple[dict, dict]:
    from torch.func import stack_module_state

    if len({type(n) for n in nets}) == 1:
        params, buffers = stack_module_state(nets)
        return {k: v.detach() for k, v in params.items()}, buffers
    # fx GraphModules of one architecture: one generated class each, the same structure
    params = {k: torch.stack([dict(n.named_parameters())[k].detach() for n in nets]) for k, _ in nets[0].named_parameters()}
    buffers = {k: torch.stack([dict(n.named_buffers())[k] for n in nets]) for k, _ in nets[0].named_buffers()}
    return params, buffers


class StackedMembers(nn.Module):
    """Same-architecture networks evaluated in one vmapped call (eval mode, no grad):
    ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        nets = [n.eval() for n in nets]
        self.params, self.buffers_ = _stack_state(nets)
        base = copy.deepcopy(nets[0]).to("meta")
        self._base = [base]  # not a submodule: its meta tensors are no state
        self.num_members = len(nets)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        base = self._base[0]

        def one(p, b, inp):
            return functional_call(base, (p, b), (inp,))

        return torch.vmap(one, in_dims=(0, 0, None))(self.params, self.buffers_, x)


def _is_mlp(net: nn.Module) -> bool:
    """No convolution and at least two Linear layers: the members that stacked faster on a CPU."""
    mods = list(net.modules())
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in mods) and sum(isinstance(m, nn.Linear) for m in mods) >= 2


class MemberRunner:
    """Runs a list of member networks on a batch: same-arch groups stacked, others looped.

    ``forward(x) -> (members, N, C)`` logits in the members' order. ``fold``: conv + BN
    folded first (:func:`fold_bn`), for both paths; the members' own modules stay untouched.
    ``stack``: ``None`` (auto) stacks on a CUDA device, and on other devices only MLPs (no
    convolution, two or more Linear layers), decided at the first batch: on a CPU, vmap turns
    each stacked conv into a grouped conv over members x channels plus copies around every
    layer, which costs more than the members' convs one after another, while stacked MLPs run
    faster than the loop and a single Linear loses to vmap's own cost; on a GPU one launch
    instead of one per member wins at small batches and ties at large ones
    (benchmarks/ensemble.py; docs/benchmarks.md, "Ensembles: stacked vs looped").
    """

    def __init__(self, nets: Sequence[nn.Module], keys: Sequence, stack: Optional[bool] = None, fold: bool = True) -> None:
        self.nets = [fold_bn(n) if fold else n.eval() for n in nets]
        self.stack = stack
        self._keys = list(keys)
        self.groups: list[tuple[list[int], object]] = self._group(stack) if stack is not None else []

    def _group(self, stack: bool) -> list[tuple[list[int], object]]:
        groups: list[tuple[list[int], object]] = []
        by_key: dict = {}
        for i, k in enumerate(self._keys):
            by_key.setdefault(k, []).append(i)
        for idx in by_key.values():
            if stack and len(idx) > 1:
                groups.append((idx, StackedMembers([self.nets[i] for i in idx])))
            else:
                groups.extend(([i], self.nets[i]) for i in idx)
        return groups

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.stack is None:
            self.stack = x.device.type == "cuda" or all(_is_mlp(n) for n in self.nets)
            self.groups = self._group(self.stack)
        out: list[Optional[torch.Tensor]] = [None] * len(self.nets)
        for idx, fn in self.groups:
            y = fn(x)
            if len(idx) == 1 and not isinstance(fn, StackedMembers):
                y = y[None]
            for j, i in enumerate(idx):
                out[i] = y[j]
        return torch.stack(out)


def table(rows: dict[str, dict[str, float]]) -> str:
    cols = ("top1", "top5", "nll", "brier", "ece")
    width = max(len(n) for n in rows) + 2
    lines = [f"{'':{width}s}" + "".join(f"{c:>9s}" for c in cols)]
    for name, r in rows.items():
        lines.append(f"{name:{width}s}" + "".join(f"{r[c]:9.4f}" for c in cols))
    return "\n".join(lines)


def reliability_png(path: Path, curves: dict[str, tuple]) -> Path:
    """Reliability diagram (accuracy vs confidence in 15 bins) for named (probs, labels) or
    (probs, labels, scores): the prediction is the top-1 of ``scores`` (the vote's tie-break),
    its confidence the probability (vote share) of that class, as in :func:`metrics`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    for name, (probs, y, *scores) in curves.items():
        pred = (scores[0] if scores else probs).argmax(-1)
        conf = probs.gather(1, pred[:, None]).squeeze(1)
        correct = (pred == y).float()
        idx = torch.bucketize(conf, edges[1:-1])
        xs, ys = [], []
        for b in range(ECE_BINS):
            sel = idx == b
            if sel.any():
                xs.append(float(conf[sel].mean()))
                ys.append(float(correct[sel].mean()))
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"reliability ({ECE_BINS} bins)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_members(logits: torch.Tensor, y: torch.Tensor, names: Sequence[str],
                     how: Combine = "mean_prob") -> dict[str, dict[str, float]]:
    """Metrics of every member, the best member (by top-1, then NLL) and the ensemble."""
    rows = {}
    for name, lg in zip(names, logits):
        rows[name] = metrics(lg.float().softmax(-1), y)
    best = min(names, key=lambda n: (-rows[n]["top1"], rows[n]["nll"]))
    rows[f"best member ({best})"] = rows[best]
    rows[f"ensemble ({how})"] = metrics(combine(logits, how), y, ranking_scores(logits, how))
    return rows


def best_index(rows: dict[str, dict[str, float]]) -> int:
    """Index of the best member in the rows of :func:`evaluate_members`."""
    members = [n for n in rows if not n.startswith(("best member (", "ensemble ("))]
    best = next(n for n in rows if n.startswith("best member ("))[len("best member ("):-1]
    return members.index(best)


class Ensemble(L.Callback):
    """Snapshot ensembles inside one run (Huang et al. 2017; Loshchilov & Hutter 2017).

    Every ``every_n_epochs`` epochs (the length of one cosine cycle for snapshot ensembles; 1 for
    the top-k checkpoints) the network's weights are saved to
    ``<run dir>/snapshots/epoch=NNN.pt``; the ``k`` best by ``monitor`` (or the ``k`` newest when
    ``monitor`` is None) are kept. At the end of fit and in test the ensemble of the kept
    snapshots is evaluated on the val/test dataloaders: the table is printed and
    ``ensemble/*`` (``test_ensemble/*``) logged, with a reliability diagram PNG in the run dir.

    Args:
        use_ema: snapshot the WeightEMA weights when that callback is on.
        stack: run the snapshots stacked (vmap); None: on a GPU, and MLPs on any device (:class:`MemberRunner`).
    """

    def __init__(self, k: int = 5, every_n_epochs: int = 1, monitor: Optional[str] = "val/acc1",
                 mode: Literal["max", "min"] = "max", combine: Combine = "mean_prob", use_ema: bool = False,
                 stack: Optional[bool] = None) -> None:
        if k < 1 or every_n_epochs < 1:
            raise ValueError(f"Ensemble needs k >= 1 and every_n_epochs >= 1, got {k} and {every_n_epochs}")
        if combine not in COMBINERS:
            raise ValueError(f"unknown combiner {combine!r}; choose one of {', '.join(COMBINERS)}")
        if mode not in ("max", "min"):
            raise ValueError(f"Ensemble mode must be 'max' or 'min', got {mode!r}")
        self.k, self.every_n_epochs, self.monitor, self.mode = k, every_n_epochs, monitor, mode
        self.combine, self.use_ema, self.stack = combine, use_ema, stack
        self.snapshots: list[dict] = []  # {"path", "epoch", "score"}
        self.last_rows: dict[str, dict[str, float]] = {}

    def _dir(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / "snapshots"

    def _weights(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}
        if self.use_ema:
            from .ema import WeightEMA

            ema = next((c for c in trainer.callbacks if isinstance(c, WeightEMA)), None)
            if ema is not None and ema.ema is not None:
                sd.update({k: v.detach().cpu().clone() for k, v in ema.ema.items()})
        return sd

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if any(s["epoch"] == trainer.current_epoch for s in self.snapshots):
            return
        score = None
        if self.monitor:
            if self.monitor not in trainer.callback_metrics:
                raise ValueError(f"Ensemble monitors {self.monitor!r}, which was not logged; "
                                 f"logged: {sorted(trainer.callback_metrics)[:8]}")
            score = float(trainer.callback_metrics[self.monitor])
        path = self._dir(trainer) / f"epoch={trainer.current_epoch:03d}.pt"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self._weights(trainer, pl_module), tmp)
            tmp.replace(path)
        self.snapshots.append({"path": str(path), "epoch": trainer.current_epoch, "score": score})
        if len(self.snapshots) > self.k:
            if self.monitor:
                sign = -1.0 if self.mode == "max" else 1.0
                drop = max(self.snapshots, key=lambda s: (sign * s["score"], -s["epoch"]))
            else:
                drop = min(self.snapshots, key=lambda s: s["epoch"])
            self.snapshots.remove(drop)
            if trainer.is_global_zero:
                Path(drop["path"]).unlink(missing_ok=True)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, split: str) -> Optional[dict[str, dict[str, float]]]:
        from ._batches import as_list, iterate, precision_context

        if not self.snapshots:
            return None
        loaders = as_list(trainer.val_dataloaders if split == "val" else trainer.test_dataloaders)
        if not loaders:
            return None
        nets = []
        for s in self.snapshots:
            net = copy.deepcopy(pl_module.net)
            net.load_state_dict(torch.load(s["path"], map_location=pl_module.device, weights_only=True))
            nets.append(net.eval())
        runner = MemberRunner(nets, [0] * len(nets), stack=self.stack)
        all_logits, all_y = [], []
        for x, y in iterate(loaders[0], pl_module):
            with precision_context(trainer):
                all_logits.append(runner(x).float())
            all_y.append(y.clone())  # FFCV reuses its batch buffers: keep a copy
        logits = pl_module.all_gather(torch.cat(all_logits, 1))
        y = pl_module.all_gather(torch.cat(all_y))
        if logits.ndim == 4:  # (world, members, N, C) -> (members, world * N, C)
            logits = logits.permute(1, 0, 2, 3).reshape(logits.shape[1], -1, logits.shape[-1])
            y = y.reshape(-1)
        names = [f"epoch {s['epoch']}" for s in self.snapshots]
        rows = evaluate_members(logits.cpu(), y.cpu(), names, self.combine)
        self.last_rows = rows
        self._report(trainer, rows, logits.cpu(), y.cpu(), split)
        return rows

    @rank_zero_only
    def _report(self, trainer, rows, logits, y, split) -> None:
        print(f"Ensemble of {len(self.snapshots)} snapshots on {split}:\n{table(rows)}", flush=True)
        reliability_png(Path(trainer.default_root_dir) / f"ensemble_reliability_{split}.png", {
            "best member": (logits[best_index(rows)].softmax(-1), y),
            "ensemble": (combine(logits, self.combine), y, ranking_scores(logits, self.combine)),
        })

    def on_fit_end(self, trainer, pl_module) -> None:
        rows = self.evaluate(trainer, pl_module, "val")
        if rows and trainer.logger is not None:
            ens = rows[f"ensemble ({self.combine})"]
            trainer.logger.log_metrics({f"ensemble/{k}": v for k, v in ens.items()}, step=trainer.global_step)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows = self.evaluate(trainer, pl_module, "test")
        if rows:
            for k, v in rows[f"ensemble ({self.combine})"].items():
                pl_module.log(f"test_ensemble/{k}", v, sync_dist=False)

    def state_dict(self) -> dict:
        return {"snapshots": [dict(s) for s in self.snapshots]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.snapshots = [dict(s) for s in state_dict.get("snapshots", [])]
