"""BN statistics: the estimator is exact, each planted fault fires naming its layer, a healthy
model raises nothing, PreciseBN recomputes, and the cases without BN or with little data."""

import logging

import pytest
import torch
from torch import nn

from callbacks.bn import BNStatsCheck, BNStatsError, PreciseBN, estimate_population_stats
from tests.test_base import NUM_CLASSES, TinyData, trainer
from zoo.base import ImageClassifier

SMALL = {"widths": [8, 16]}


@pytest.fixture(autouse=True)
def _bn_lines_at_info(caplog):
    caplog.set_level(logging.INFO, logger="callbacks.bn")


def _said(caplog) -> str:
    """The BN callbacks' lines (the ``callbacks.bn`` logger) since the last call."""
    text = caplog.text
    caplog.clear()
    return text


def small_model(**kw):
    return ImageClassifier(arch="convnet", num_classes=NUM_CLASSES, arch_args=SMALL, lr=0.05,
                           lr_reference_batch=None, **kw)


class ShiftedData(TinyData):
    """The same images, darker and flatter: the BN inputs' population moves."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.x = self.x // 4 + 10


@pytest.fixture(scope="module")
def healthy():
    torch.manual_seed(0)
    m = small_model()
    # 48 steps: BN momentum 0.1 forgets its (0, 1) start (0.9**48 < 0.01), the cosine LR ends at 0
    t = trainer(max_epochs=6, limit_val_batches=0)
    t.fit(m, datamodule=TinyData(n=64))
    return m


def test_estimator_matches_full_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(40, 3, 10, 10) * 3 + 1
    # uneven batches: the estimator weights by the number of values, not per batch
    stats, used = estimate_population_stats(net, [x[:7], x[7:30], x[30:]], num_samples=10**6)
    assert used == 40
    # buffers and modes untouched
    assert torch.equal(net[1].running_mean, torch.zeros(4)) and int(net[1].num_batches_tracked) == 0
    assert net.training
    net.train()
    a = net[0](x)
    torch.testing.assert_close(stats["1"][0], a.mean((0, 2, 3)))
    torch.testing.assert_close(stats["1"][1], a.var((0, 2, 3), correction=0))
    # the second BN sees each batch normalised with its own batch statistics, as in training
    b = torch.cat([net[3](net[2](net[1](net[0](xb)))) for xb in (x[:7], x[7:30], x[30:])])
    torch.testing.assert_close(stats["4"][0], b.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["4"][1], b.var((0, 2, 3), correction=0), rtol=1e-4, atol=1e-5)


def _check(m, data, caplog, tmp_path=None, **kw):
    import tempfile

    check = BNStatsCheck(**kw)
    root = tmp_path or tempfile.mkdtemp()
    trainer(callbacks=[check], limit_val_batches=2, default_root_dir=root).validate(m, datamodule=data)
    out = _said(caplog)
    return check, out


def test_healthy_model_raises_nothing(healthy, caplog):
    check, out = _check(healthy, TinyData(n=64), caplog, action="fail")
    assert check.last_findings == [], out
    assert "BN layers healthy" in out
    assert "train data gave 64 samples < 8192" in out  # fewer than K: uses what exists, says so
    s = check.last_summary
    assert s["bn/mean_err_max"] < 0.25 and abs(s["bn/val_acc1_running"] - s["bn/val_acc1_recomputed"]) <= 0.05


def test_nan_buffer_fires_naming_the_layer(healthy, caplog):
    import copy

    m = copy.deepcopy(healthy)
    m.net.stages[1][0].bn.running_var[3] = float("nan")
    check, out = _check(m, TinyData(n=64), caplog)
    assert "BNStatsCheck: stages.1.0.bn: 1 NaN/Inf values" in out
    with pytest.raises(BNStatsError, match="stages.1.0.bn"):
        _check(m, TinyData(n=64), caplog, action="fail")


def test_collapsed_variance_fires(healthy, caplog):
    import copy

    m = copy.deepcopy(healthy)
    m.net.stages[0][0].bn.running_var[:5] = 1e-6  # eps 1e-5: below 10 x eps
    check, out = _check(m, TinyData(n=64), caplog)
    assert "stages.0.0.bn: 5/8 channels with running_var < 10 x eps" in out
    assert check.last_summary["bn/collapsed_channels"] == 5


def test_stale_statistics_after_input_shift_fire_and_recalibrate(healthy, caplog):
    import copy

    m = copy.deepcopy(healthy)
    check, out = _check(m, ShiftedData(n=64), caplog, action="recalibrate")
    assert "stages.0.0.bn: running statistics differ from the population's" in out
    assert "recalibrated 2 BN layers" in out
    # after recalibration the running statistics are the population's: a second check is quiet
    check2, out2 = _check(m, ShiftedData(n=64), caplog, action="fail")
    assert check2.last_findings == []


def test_model_without_bn_says_so_once(caplog, tmp_path):
    m = ImageClassifier(arch="logreg", num_classes=NUM_CLASSES, arch_args={"input_size": 24})
    check = BNStatsCheck()
    trainer(callbacks=[check], max_epochs=2, limit_val_batches=1, default_root_dir=tmp_path).fit(
        m, datamodule=TinyData(res=24))
    out = _said(caplog)
    assert out.count("no BatchNorm layers") == 1


def test_check_during_fit_logs_and_writes_table(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    check = BNStatsCheck(num_samples=16, val_samples=16)
    t = trainer(callbacks=[check], max_epochs=1, limit_val_batches=2, default_root_dir=tmp_path,
                logger=CSVLogger(tmp_path, name="csv", version=""))
    t.fit(small_model(), datamodule=TinyData())
    assert {"bn/findings", "bn/mean_err_max", "bn/heldout_acc1_running", "bn/check_seconds"} <= set(t.callback_metrics)
    rows = (tmp_path / "bn_stats").glob("*.csv")
    text = next(rows).read_text()
    assert text.startswith("layer,channels") and "stages.1.0.bn" in text


def test_precise_bn_recomputes_on_model_and_ema():
    from callbacks.ema import WeightEMA

    torch.manual_seed(0)
    m = small_model()
    ema = WeightEMA(decay=0.9, evaluate_with_ema=False)
    pbn = PreciseBN(num_samples=32)
    # limit_train_batches: the epoch ends before its loader does; the extra pass still runs
    t = trainer(callbacks=[ema, pbn], max_epochs=1, limit_val_batches=1, limit_train_batches=2)
    t.fit(m, datamodule=TinyData())
    # the model's running statistics now equal an estimate over the train data
    data = TinyData()
    xs = [m.preprocess(x) for x, _ in data.train_dataloader()]
    stats, _ = estimate_population_stats(m.net, xs, 32)
    # the first BN's input does not depend on how the (shuffled) batches were composed
    first = m.net.stages[0][0].bn
    torch.testing.assert_close(first.running_mean, stats["stages.0.0.bn"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, stats["stages.0.0.bn"][1], rtol=1e-4, atol=1e-5)
    # the EMA's BN statistics were recomputed with the EMA weights (not copied from the model)
    key = "stages.1.0.bn.running_var"
    assert not torch.allclose(ema.ema[key], m.net.state_dict()[key])


def test_bad_arguments():
    with pytest.raises(ValueError, match="action must be"):
        BNStatsCheck(action="fix")
    with pytest.raises(ValueError, match="max_overhead"):
        BNStatsCheck(max_overhead=0)
    with pytest.raises(ValueError, match="num_samples"):
        PreciseBN(num_samples=0)


def test_callbacks_leave_the_trained_weights_unchanged(tmp_path):
    """The extra passes (EMA validation, BN check, precise BN) must not touch training."""
    from callbacks.bn import BNBufferSync
    from callbacks.ema import WeightEMA
    from tests.test_callbacks import OrderedData

    def run(callbacks):
        torch.manual_seed(0)
        m = small_model()
        trainer(max_epochs=2, limit_val_batches=2, callbacks=callbacks, default_root_dir=tmp_path).fit(
            m, datamodule=OrderedData())
        return {k: v for k, v in m.net.state_dict().items() if "running" not in k and "num_batches" not in k}

    plain = run([])
    busy = run([WeightEMA(decay=0.9), BNStatsCheck(num_samples=16, val_samples=16), PreciseBN(num_samples=16),
                BNBufferSync()])
    for k, v in plain.items():
        torch.testing.assert_close(busy[k], v, msg=k)


def epochs_checked(check: BNStatsCheck, max_epochs: int, tmp_path) -> list[int]:
    """Fit a small model on 64 images with ``check``; the epochs at which the check ran."""
    ran = []
    run = check.run
    check.run = lambda trainer, pl_module: ran.append(trainer.current_epoch) or run(trainer, pl_module)
    trainer(callbacks=[check], max_epochs=max_epochs, limit_val_batches=2, default_root_dir=tmp_path).fit(
        small_model(), datamodule=TinyData(n=64))
    return ran


def test_default_schedule_keeps_the_check_within_its_budget(tmp_path, caplog):
    """every_n_epochs=None: the period comes from counted forward passes, counted back from
    the last epoch; it survives a checkpoint (a resumed partial epoch would count otherwise)."""
    torch.manual_seed(0)
    # 64 train images (8 batches of 8), 16 val images (2 batches): one check is 3 x 32 estimator
    # + 2 x 8 val + 2 x 16 held-out forwards = 144 against 3 x 64 for training, 0.75 of an epoch;
    # a 20% budget gives a period of ceil(0.75 / 0.2) = 4 epochs: epochs 4 and 0 of 0..4
    check = BNStatsCheck(num_samples=32, val_samples=8, max_overhead=0.2)
    ran = epochs_checked(check, 5, tmp_path)
    assert check.check_cost() == pytest.approx(144 / 192)
    assert check.auto_every == 4 and ran == [0, 4]
    assert "one check costs 75% of a train epoch here (forward passes counted); it runs every 4 epoch(s)" in _said(caplog)
    resumed = BNStatsCheck()
    resumed.load_state_dict(check.state_dict())
    assert resumed.auto_every == 4
    # an explicit period: epochs 0, 2, 4
    assert epochs_checked(BNStatsCheck(num_samples=32, val_samples=8, every_n_epochs=2), 5, tmp_path) == [0, 2, 4]


def test_fit_shorter_than_the_period_is_checked_once_at_its_end(tmp_path, caplog):
    # the same counts as above with a 5% budget: a period of ceil(0.75 / 0.05) = 15 > 3 epochs
    check = BNStatsCheck(num_samples=32, val_samples=8, max_overhead=0.05)
    ran = epochs_checked(check, 3, tmp_path)
    assert check.auto_every == 15 and ran == [2]
    # fewer images than min_samples (256): the one check keeps them all
    assert check.short_fit_samples == (32, 8)
    assert ("this fit has 3 epoch(s): one check at its end, on 32 train and 8 val images (at least 256 each), "
            "~25% of the fit") in _said(caplog)


def test_the_one_check_of_a_short_fit_shrinks_to_the_budget(tmp_path, caplog, monkeypatch):
    """A fit too short for the period: num_samples and val_samples scaled by one factor so the
    check fits max_overhead of the fit, floored at min_samples; the choice survives a checkpoint."""
    import callbacks.bn.stats_check as stats_check

    asked = []
    real = stats_check.estimate_population_stats
    monkeypatch.setattr(stats_check, "estimate_population_stats",
                        lambda net, inputs, num_samples, **kw: asked.append(num_samples) or real(net, inputs, num_samples, **kw))
    # mean_tol 2: min_samples (4 / 2)^2 = 4. A 10% budget: period ceil(0.75 / 0.1) = 8 > 3 epochs, so
    # 0.3 of an epoch for the one check; the held-out batch takes 32 / 192, the rest scales 112 / 192
    # (3 x 32 + 2 x 8) by (0.3 - 1/6) / (7/12) = 0.229: 7 train images, 1 val image -> 4
    check = BNStatsCheck(num_samples=32, val_samples=8, max_overhead=0.1, mean_tol=2.0)
    assert check.min_samples == 4 and BNStatsCheck().min_samples == 256
    ran = epochs_checked(check, 3, tmp_path)
    assert check.auto_every == 8 and ran == [2] and check.short_fit_samples == (7, 4) and asked == [7]
    assert check.check_cost((7, 1)) / 3 <= 0.1 < check.check_cost((8, 1)) / 3  # before the floor: the budget's largest
    assert "one check at its end, on 7 train and 4 val images (at least 4 each)" in _said(caplog)
    resumed = BNStatsCheck()
    resumed.load_state_dict(check.state_dict())
    assert resumed.short_fit_samples == (7, 4)
    # `zoo validate` pays for one check only: the full num_samples
    trainer(callbacks=[check], limit_val_batches=2, default_root_dir=tmp_path).validate(small_model(), datamodule=TinyData(n=64))
    assert asked == [7, 32]
