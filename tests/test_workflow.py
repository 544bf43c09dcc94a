"""The course's workflow tools: fit diagnosis, gradient check, init statistics, sweeps, landscapes."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.fit_diagnosis import FitDiagnosis
from zoo.base import ImageClassifier


# ----------------------------------------------------------------------------- FitDiagnosis
class NoiseData(L.LightningDataModule):
    """Gaussian-noise images with random labels: val is unpredictable from train, so a model
    that memorises the train set overfits by construction."""

    def __init__(self, n_train=32, n_val=32, res=12, classes=4, batch_size=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.xt = torch.randn(n_train, 3, res, res, generator=g)
        self.yt = torch.randint(0, classes, (n_train,), generator=g)
        self.xv = torch.randn(n_val, 3, res, res, generator=g)
        self.yv = torch.randint(0, classes, (n_val,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.xt, self.yt), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.xv, self.yv), batch_size=self.batch_size)


def _fit_with_diagnosis(model, epochs):
    diag = FitDiagnosis()
    t = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[diag])
    t.fit(model, datamodule=NoiseData())
    return diag


def test_fit_diagnosis_calls_a_loss_that_never_moves_not_learning():
    torch.manual_seed(0)
    # logreg with a tiny LR (and a huge weight decay): the train loss never leaves ln(4)
    m = ImageClassifier(arch="logreg", num_classes=4, arch_args={"input_size": 12}, lr=1e-5,
                        lr_reference_batch=None, weight_decay=10.0, schedule="constant")
    diag = _fit_with_diagnosis(m, epochs=2)
    assert len(diag.history) == 2
    d = diag.last
    assert d.verdict == "not learning" and d.cause == "stuck", d.line()
    assert "lr 1e-05 is too low" in d.reason and "train longer" not in d.reason


def test_fit_diagnosis_calls_a_large_model_on_few_images_overfitting():
    torch.manual_seed(0)
    # 1.2 M parameters for 32 noise images with random labels: memorised, val loss climbs
    m = ImageClassifier(arch="mlp", num_classes=4, arch_args={"input_size": 12, "width": 1024, "depth": 2},
                        optimizer="adamw", lr=1e-3, lr_reference_batch=None, weight_decay=0.0,
                        schedule="constant")
    diag = _fit_with_diagnosis(m, epochs=4)
    d = diag.last
    assert d.verdict == "overfitting", d.line()
    assert d.train_acc1 - d.val_acc1 >= 0.1 and d.val_loss_rise >= 0.05
    verdicts = [h["verdict"] for h in diag.history]
    assert "overfitting" not in verdicts[:1]  # not before val has had a chance to get worse


def test_fit_diagnosis_rule_and_state():
    diag = FitDiagnosis()
    m = {"train/loss_epoch": 0.1, "train/acc1": 0.99, "val/loss": 0.2, "val/acc1": 0.95}
    assert diag.diagnose(m, 0, 10).verdict == "fine"
    diag.history.append({"val_loss": 0.2, "train_loss": 0.1})
    m = {"train/loss_epoch": 0.05, "val/loss": 0.9}  # no train acc (mixup): the loss gap decides
    assert diag.diagnose(m, 1, 10).verdict == "overfitting"
    assert FitDiagnosis().diagnose({"val/loss": 1.0}, 0, 10) is None  # nothing to compare
    with pytest.raises(ValueError, match="underfit_progress"):
        FitDiagnosis(underfit_progress=2)
    other = FitDiagnosis()
    other.load_state_dict(diag.state_dict())
    assert other.history == diag.history


def _diagnose_history(epochs, num_classes=10, label_smoothing=0.0, lr=None):
    """Feed a synthetic metric history (one dict per validation) through the rule, as the
    callback does; return the last Diagnosis."""
    diag = FitDiagnosis()
    for epoch, (tl, ta, vl, va) in enumerate(epochs):
        m = {"train/loss_epoch": tl, "val/loss": vl, **({"train/acc1": ta} if ta is not None else {}),
             **({"val/acc1": va} if va is not None else {})}
        d = diag.diagnose(m, epoch, num_classes, label_smoothing, lr)
        diag.history.append(dataclasses.asdict(d))
    return d


def test_loss_floor_of_label_smoothing():
    from callbacks.fit_diagnosis import loss_floor

    assert loss_floor(10, 0.0) == 0.0
    # the entropy of (0.91, 0.01 x 9): the smoothed target is the best prediction
    assert loss_floor(10, 0.1) == pytest.approx(-(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01)))
    q = torch.full((10,), 0.01)
    q[0] = 0.91
    assert torch.nn.functional.cross_entropy(q.log()[None], torch.tensor([0]), label_smoothing=0.1).item() == pytest.approx(loss_floor(10, 0.1), rel=1e-5)


def test_fit_diagnosis_label_smoothing_and_augmentation_are_not_underfitting():
    # 10 classes, label smoothing 0.1 (floor 0.50): val top-1 0.976 while augmentation keeps the
    # train loss at 1.40 > 0.5 x ln(10) = 1.15 (the old rule's line) and train top-1 below val's
    hist = [(2.00, 0.50, 0.90, 0.80), (1.70, 0.72, 0.50, 0.90), (1.55, 0.82, 0.30, 0.94),
            (1.47, 0.87, 0.20, 0.96), (1.42, 0.89, 0.15, 0.972), (1.40, 0.90, 0.12, 0.976)]
    d = _diagnose_history(hist, label_smoothing=0.1, lr=0.05)
    assert 1.40 > 0.5 * math.log(10)
    assert d.verdict == "fine", d.line()
    assert d.loss_floor == pytest.approx(0.5003, abs=1e-4)


def test_fit_diagnosis_memorised_train_set_with_a_val_gap_is_overfitting():
    # epoch 12: train top-1 1.000 vs val 0.707; val loss still creeps down (never 5 % above its best)
    hist = [(2.0 - 0.15 * e, min(0.3 + 0.06 * e, 1.0), 1.20 - 0.02 * min(e, 10), 0.50 + 0.02 * min(e, 10) + 0.0035 * (e == 12))
            for e in range(13)]
    hist[-1] = (0.05, 1.000, 0.975, 0.707)
    d = _diagnose_history(hist, lr=0.01)
    assert d.epoch == 12 and d.val_loss_rise < 0.05
    assert d.verdict == "overfitting", d.line()
    assert "top-1 gap 0.293" in d.reason and "memorised" in d.reason


def test_fit_diagnosis_val_stalled_with_a_gap_is_overfitting():
    # train top-1 0.95 (not memorised), val stuck at 0.80 for 4 validations: the gap will not close
    hist = [(1.0, 0.70, 0.80, 0.74), (0.6, 0.85, 0.66, 0.80), (0.4, 0.90, 0.65, 0.80),
            (0.3, 0.93, 0.655, 0.80), (0.25, 0.95, 0.655, 0.801)]
    d = _diagnose_history(hist)
    assert d.verdict == "overfitting" and d.cause == "stalled", d.line()


def test_fit_diagnosis_lr_too_low_is_not_learning_not_train_longer():
    # LR 1e-6: the loss never moved from ln(10) = 2.3026, top-1 at chance
    hist = [(2.3031, 0.098, 2.3029, 0.10), (2.3029, 0.101, 2.3028, 0.10), (2.3027, 0.102, 2.3027, 0.10),
            (2.3026, 0.099, 2.3026, 0.11)]
    d = _diagnose_history(hist, lr=1e-6)
    assert d.verdict == "not learning" and d.cause == "stuck", d.line()
    assert "lr 1e-06 is too low" in d.reason and "train longer" not in d.reason


def test_fit_diagnosis_slow_and_plateaued_underfitting():
    # still falling fast, far from fitted: too few epochs
    slow = [(2.25, 0.15, 2.20, 0.18), (2.05, 0.25, 2.00, 0.27), (1.85, 0.33, 1.82, 0.35)]
    d = _diagnose_history(slow, lr=0.01)
    assert d.verdict == "underfitting" and d.cause == "slow", d.line()
    assert "train longer" in d.reason
    # flat at 35 % of the reachable drop: not a matter of epochs
    flat = [(1.80, 0.38, 1.78, 0.38), (1.68, 0.40, 1.67, 0.40), (1.675, 0.40, 1.67, 0.41)]
    d = _diagnose_history(flat, lr=0.01)
    assert d.verdict == "underfitting" and d.cause == "plateau", d.line()
    assert "more capacity" in d.reason and "train longer" not in d.reason


def test_fit_diagnosis_fine_and_diverged():
    good = [(0.9, 0.70, 0.80, 0.72), (0.5, 0.84, 0.50, 0.83), (0.35, 0.89, 0.40, 0.87)]
    d = _diagnose_history(good)
    assert d.verdict == "fine" and d.val_trend == "improving", d.line()
    d = _diagnose_history([(2.0, 0.2, 2.0, 0.2), (float("nan"), None, float("nan"), 0.1)], lr=3.0)
    assert d.verdict == "not learning" and d.cause == "diverged" and "too high" in d.reason, d.line()
    # exploding but still finite: not "LR too low"
    d = _diagnose_history([(2.4, 0.1, 3.0, 0.1), (9.0, 0.1, 40.0, 0.1), (6e23, 0.02, 8e26, 0.13)], lr=0.05)
    assert d.verdict == "not learning" and d.cause == "diverged" and "lr 0.05 is too high" in d.reason, d.line()


# ----------------------------------------------------------------------------- gradcheck
from launch.cli import main  # noqa: E402
from zoo import model_checks  # noqa: E402


@pytest.mark.parametrize("arch", ["logreg", "mlp", "convnet"])
def test_gradcheck_passes_on_the_zoo_small_models(arch, tmp_path, capsys):
    assert main(["gradcheck", arch, "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "max relative error" in out and (tmp_path / "gradcheck.csv").is_file()


def test_gradcheck_passes_with_skips_and_batchnorm():
    net, shape = model_checks.small_instance("convnet", num_classes=3, skip=True, widths=(4, 4), depths=2)
    rows = model_checks.gradcheck(net, shape, 3, per_tensor=2)
    assert any("bn" in r.param for r in rows)
    assert max(r.rel_error for r in rows) < 1e-5


class _WrongReLU(torch.autograd.Function):
    """ReLU whose backward lets the gradient through where the input is negative, too."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad  # planted bug: should be grad * (x > 0)


class _PlantedNet(torch.nn.Module):
    def __init__(self, num_classes=5, input_size=6):
        super().__init__()
        self.hidden = torch.nn.Linear(3 * input_size * input_size, 16)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(_WrongReLU.apply(self.hidden(x.flatten(1))))


def test_gradcheck_catches_a_wrong_backward(tmp_path, capsys):
    rows = model_checks.gradcheck(_PlantedNet(), (3, 6, 6), 5)
    bad = [r for r in rows if r.rel_error > 1e-4]
    assert {r.param for r in bad} >= {"hidden.weight", "hidden.bias"}  # the layer below the bug
    assert all(r.rel_error < 1e-6 for r in rows if r.param.startswith("fc."))  # above it: right

    from zoo import registry

    name = "planted_wrong_backward"
    if name not in registry.list_models():
        registry.register_model(name, data_config=registry.DataConfig(input_size=6))(_PlantedNet)
    assert main(["gradcheck", name, "--model.arch_args", '{"input_size": 6}', "--out_dir", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out


# ----------------------------------------------------------------------------- init statistics
@pytest.mark.parametrize("arch,args,size", [("mlp", {"depth": 6, "width": 256, "input_size": 16}, 16),
                                            ("convnet", {}, 64)])  # the demo's ConvNet, as built
def test_init_stats_default_keeps_scale_naive_blows_up_or_vanishes(arch, args, size):
    from zoo.init import init_weights_
    from zoo.registry import create_network

    def stats(scheme=None):
        torch.manual_seed(0)
        net = create_network(arch, num_classes=10, **args)
        if scheme is not None:
            init_weights_(net, scheme)
        return model_checks.init_stats(net, (3, size, size), batch_size=16)

    default = stats()
    # every activation (and the MLP's logits) within x2 of the input's E[a^2] = 1; the ConvNet's
    # logits follow a global average pool, which shrinks E[a^2] by itself (not an init effect)
    rows = default if arch == "mlp" else default[:-1]
    assert len(rows) >= 5 and model_checks.max_scale_drift(rows) <= 2.0, [(s.layer, s.mean_square) for s in rows]
    big, small = stats("normal")[-2], stats("small")[-2]  # the last activation
    assert big.mean_square > 1e3 and small.mean_square < 1e-3


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_init_stats_shows_saturation_of_sigmoid_and_tanh(activation):
    from zoo.init import init_weights_
    from zoo.registry import create_network

    def stats(scheme):
        torch.manual_seed(0)
        net = create_network("mlp", num_classes=10, activation=activation, input_size=16, depth=3, width=128)
        init_weights_(net, scheme)
        return [s for s in model_checks.init_stats(net, (3, 16, 16), batch_size=32) if s.layer.startswith("blocks.")]

    bad, good = stats("normal"), stats("fan_in")
    assert len(bad) == 3 and all(s.saturated > 0.5 and s.flagged for s in bad), [(s.layer, s.saturated) for s in bad]
    assert all(s.saturated < 0.1 and not s.flagged for s in good), [(s.layer, s.saturated) for s in good]
    # E[a^2] alone does not tell: the saturated sigmoid's (~0.5, outputs near 0 and 1) is no
    # farther from the input's 1 than fan-in's (~0.27, outputs near 0.5)
    if activation == "sigmoid":
        assert abs(math.log(bad[0].mean_square)) < abs(math.log(good[0].mean_square))
    # the backward signal: reported per layer, and with sigmoid's derivative <= 1/4 it shrinks toward the input
    assert all(s.grad_var is not None and s.grad_var > 0 for s in good)
    assert good[0].grad_var < good[-1].grad_var


def test_init_stats_command_flags_saturated_layers(tmp_path, capsys):
    assert main(["init-stats", "mlp", "--model.arch_args", '{"depth": 2, "width": 32, "input_size": 8, "activation": "sigmoid"}',
                 "--batch_size", "16", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "saturated outputs" in out and "Var(dL/da)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("N(0,1) ") and "largest departure" in ln)
    assert "saturated: blocks.0.act" in line
    assert "saturated:" not in next(ln for ln in out.splitlines() if ln.startswith("default ") and "largest departure" in ln)


def test_init_stats_command_writes_table_and_plot(tmp_path, capsys):
    assert main(["init-stats", "mlp", "--model.arch_args", '{"depth": 3, "width": 32, "input_size": 8}',
                 "--batch_size", "16", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"plot: {tmp_path / 'init_stats.png'}" in out and (tmp_path / "init_stats.csv").is_file()
    assert (tmp_path / "init_stats.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- sweep
import yaml  # noqa: E402

from launch import sweep as zsweep  # noqa: E402


def _tiny_spec(tmp_path, data_root, name="tiny", **over) -> str:
    spec = {
        "name": name, "recipe": "demo", "metric": "val/loss", "direction": "minimize", "search": "grid",
        "fixed": {"data.root": str(data_root), "data.backend": "torchvision", "data.batch_size": 6,
                  "data.num_workers": 0, "data.train_res": 24, "data.val_res": 24, "trainer.accelerator": "cpu",
                  "trainer.devices": 1, "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                  "run.logger": "csv", "model.arch_args": {"widths": [8, 16]}},
        "budget": {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2},
        "params": {"model.lr": {"low": 0.01, "high": 0.1, "log": True, "per_decade": 1},
                   "model.weight_decay": {"low": 1e-4, "high": 1e-3, "log": True, "per_decade": 1}},
        **over,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_sweep_local_grid_finishes_and_ranks(tiny_imagenet, tmp_path, capsys):
    spec = _tiny_spec(tmp_path, tiny_imagenet)
    root = tmp_path / "sweeps"
    assert main(["sweep", spec, "--run.root", str(root), "--in_process", "--wandb", "false"]) == 0
    out = capsys.readouterr().out
    assert f"table: {root / 'tiny' / 'results.csv'}" in out and f"plot: {root / 'tiny' / 'sweep.png'}" in out
    import csv

    rows = list(csv.DictReader(open(root / "tiny" / "results.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4
    assert {(float(r["model.lr"]), float(r["model.weight_decay"])) for r in rows} == {
        (0.01, 1e-4), (0.01, 1e-3), (0.1, 1e-4), (0.1, 1e-3)}  # the whole log grid, once each
    values = [float(r["value"]) for r in rows]
    assert values == sorted(values) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]  # minimize
    for r in rows:  # every trial is a normal run directory
        assert (Path(r["run_dir"]) / "checkpoints" / "last.ckpt").is_file()
        assert list(Path(r["run_dir"]).rglob("config.yaml"))  # (csv logger: under csv/)
    # --status reads the same study later
    assert main(["sweep", spec, "--run.root", str(root), "--status"]) == 0
    assert "COMPLETE" in capsys.readouterr().out


def test_sweep_refuses_bad_specs_in_one_line(tiny_imagenet, tmp_path, capsys):
    bad = [
        ({"params": {"model.lrr": {"low": 0.01, "high": 0.1}}}, "unknown parameter 'model.lrr'"),
        ({"params": {"model.lr": {"low": 0.1, "high": 0.1, "log": True}}}, "empty range"),
        ({"params": {"model.optimizer": {"values": []}}}, "empty range"),
        ({"budget": {"trainer.max_epoch": 1}}, "unknown parameter 'trainer.max_epoch'"),
    ]
    for i, (over, msg) in enumerate(bad):
        spec = _tiny_spec(tmp_path, tiny_imagenet, name=f"bad{i}", **over)
        assert main(["sweep", spec, "--run.root", str(tmp_path / "sweeps")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "sweeps" / f"bad{i}").exists()  # refused before anything ran


def test_coarse_to_fine_narrows_around_the_best_trials():
    import optuna

    params = {"model.lr": zsweep.Param("model.lr", low=1e-3, high=1.0, log=True, per_decade=2),
              "model.momentum": zsweep.Param("model.momentum", low=0.5, high=0.99, num=5)}
    dists = {k: p.distribution() for k, p in params.items()}
    study = optuna.create_study(direction="maximize")
    # the metric peaks at lr 0.1, momentum 0.9
    for lr in params["model.lr"].grid():
        for m in params["model.momentum"].grid():
            value = -abs(math.log10(lr) + 1) - abs(m - 0.9)
            study.add_trial(optuna.trial.create_trial(params={"model.lr": lr, "model.momentum": m},
                                                      distributions=dists, value=value))
    new = zsweep.narrow(params, study.get_trials(), top_k=3, direction="maximize")
    lr, mom = new["model.lr"], new["model.momentum"]
    assert params["model.lr"].low < lr.low < 0.1 < lr.high < params["model.lr"].high
    assert lr.high / lr.low < 1e3 / 10  # at least a decade narrower
    assert 0.5 < mom.low <= 0.9 <= mom.high <= 0.99 and mom.high - mom.low < 0.49
    assert lr.log and not mom.log


@pytest.mark.slow
@pytest.mark.slurm
def test_sweep_as_slurm_array_completes_every_trial(tiny_imagenet, tmp_path, capsys):
    import shutil
    import subprocess
    import time

    import optuna

    if not shutil.which("sbatch") or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.fail("local Slurm is not up: run launch/slurm/local_cluster.sh start (make test does)")
    spec = _tiny_spec(tmp_path, tiny_imagenet, name="tiny_slurm")
    root = tmp_path / "sweeps"
    assert main(["sweep", spec, "--run.root", str(root), "--slurm", "--cpus-per-task=1", "--time=10"]) == 0
    out = capsys.readouterr().out
    jobs = out.split("submitted: round arrays ")[1].split("\n")[0].replace(", report job", ",").split(", ")
    assert len(jobs) == 2  # one array for the 4 trials, one report job after it
    deadline = time.time() + 900
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True)
        if q.returncode == 0 and not q.stdout.strip():
            break
        time.sleep(1)
    sweep = zsweep.Sweep(zsweep.load_spec(spec), root)
    study = optuna.load_study(study_name=sweep.study_name(1), storage=sweep.storage())
    states = [t.state.name for t in study.get_trials()]
    logs = "\n".join(p.read_text()[-1500:] for p in (root / "tiny_slurm" / "slurm").glob("*.out"))
    assert states.count("COMPLETE") == 4, (states, logs)
    assert len({t.user_attrs["worker"] for t in study.get_trials()}) == 4  # one array task each
    assert (root / "tiny_slurm" / "results.csv").is_file() and (root / "tiny_slurm" / "sweep.png").is_file()


def test_a_trial_whose_worker_died_is_failed_and_retried(tmp_path):
    import optuna

    spec = zsweep.Spec(name="s", recipe=Path("demo.yaml"), retries=1,
                       params={"model.lr": zsweep.Param("model.lr", low=0.01, high=0.1, log=True)})
    sweep = zsweep.Sweep(spec, tmp_path)
    study = optuna.create_study(study_name="s-round1", storage=sweep.storage())
    t = study.ask({"model.lr": spec.params["model.lr"].distribution()})
    t.set_user_attr("worker", "local:" + __import__("socket").gethostname() + ":999999999")  # no such pid
    alive = study.ask({"model.lr": spec.params["model.lr"].distribution()})
    alive.set_user_attr("worker", zsweep.worker_key())
    assert zsweep.fail_stale(study, sweep) == [t.number]
    trials = study.get_trials()
    assert trials[t.number].state.name == "FAIL" and trials[alive.number].state.name == "RUNNING"
    retry = study.ask({"model.lr": spec.params["model.lr"].distribution()})  # the enqueued retry comes first, with the failed trial's parameters
    assert retry.params == t.params and retry.user_attrs["retry_of"] == t.number


# ----------------------------------------------------------------------------- loss landscape
from launch import landscape as zland  # noqa: E402


def test_directions_are_filter_normalised():
    from zoo.registry import create_network

    net = create_network("convnet", num_classes=3, widths=(4, 8))
    d = zland.filter_normalized_direction(net, torch.Generator().manual_seed(0))
    for name, p in net.named_parameters():
        if p.ndim <= 1:  # biases and BN parameters: zero in the direction
            assert torch.count_nonzero(d[name]) == 0, name
        else:  # every filter (conv output channel, Linear row) as long as the weights' filter
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
            assert not torch.allclose(d[name], p.detach())


@pytest.mark.slow
def test_landscape_of_a_trained_model_is_lowest_near_the_origin(tiny_imagenet, tmp_path, capsys):
    rc = main(["fit", "--config", str(zsweep.RECIPES / "demo.yaml"), "--data.root", str(tiny_imagenet),
               "--data.backend", "torchvision", "--data.batch_size", "6", "--data.num_workers", "0",
               "--data.train_res", "32", "--data.val_res", "32", "--trainer.accelerator", "cpu",
               "--trainer.max_epochs", "6", "--trainer.enable_progress_bar", "false",
               "--model.arch_args", '{"widths": [8, 16]}', "--model.label_smoothing", "0",
               "--run.root", str(tmp_path), "--run.name", "ls", "--run.logger", "none"])
    assert rc == 0
    ckpt = next((tmp_path / "ls").glob("*/checkpoints/last.ckpt"))
    capsys.readouterr()
    assert main(["landscape", str(ckpt), "--data.root", str(tiny_imagenet), "--res", "32", "--images", "18",
                 "--steps", "7", "--grid", "3", "--span", "2.0", "--wandb", "false"]) == 0
    out = capsys.readouterr().out
    land = ckpt.parent.parent / "landscape"
    assert f"plots: {land / 'landscape_1d.png'} {land / 'landscape_2d.png'}" in out
    import numpy as np

    r = np.load(land / "landscape.npz")
    for k in (0, 1):
        loss = r["line"][k, :, 0]
        assert abs(int(loss.argmin()) - 3) <= 1, loss  # lowest at (or next to) the origin
        assert loss[0] > 1.5 * loss[3] and loss[-1] > 1.5 * loss[3], loss  # and rises on both sides
    assert r["plane"].shape == (3, 3) and r["plane"][1, 1] == r["plane"].min()
