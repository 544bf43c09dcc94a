"""WeightEMA: the average is right, evaluation uses it, checkpoints keep both, resume restores it."""

import lightning as L
import pytest
import torch

from callbacks.ema import WeightEMA
from tests.test_base import NUM_CLASSES, TinyData, model, trainer
from zoo.base import ImageClassifier


def test_ema_tracks_weights_and_is_saved_beside_them(tmp_path):
    torch.manual_seed(0)
    m = model(lr=0.05, lr_reference_batch=None, schedule="constant")
    init = {k: v.clone() for k, v in m.net.state_dict().items() if v.dtype.is_floating_point}
    ema = WeightEMA(decay=0.5)
    t = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=1, default_root_dir=tmp_path)
    t.fit(m, datamodule=TinyData())
    assert ema.num_updates == t.global_step == 4
    w = m.net.state_dict()
    key = next(k for k in init if k.endswith("weight") and w[k].ndim == 4)
    # the EMA lies between the initial and the final weights, equal to neither
    assert not torch.equal(ema.ema[key], w[key]) and not torch.equal(ema.ema[key], init[key])
    # validation swapped the EMA in and back out
    assert torch.equal(m.net.state_dict()[key], w[key])

    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["callbacks"]["WeightEMA"]
    torch.testing.assert_close(state["ema_state_dict"][key], ema.ema[key])
    torch.testing.assert_close(ckpt["state_dict"]["net." + key], w[key])


def test_ema_update_is_a_lerp():
    m = model()
    ema = WeightEMA(decay=0.9)
    ema.on_fit_start(None, m)
    k = next(iter(ema.ema))
    with torch.no_grad():
        for p in m.net.state_dict().values():
            if p.dtype.is_floating_point:
                p.add_(1.0)
    before = ema.ema[k].clone()

    class T:
        global_step = 1
        current_epoch = 0

    ema.on_train_batch_end(T(), m, None, None, 0)
    torch.testing.assert_close(ema.ema[k], before + 0.1)


def test_ema_update_reads_the_live_tensors_without_a_state_dict_walk(monkeypatch):
    """update() finds the tensors through the module dicts remembered at fit start: it follows
    a buffer replaced since (what .to() does) and matches the state_dict walk on every tensor;
    a module whose state_dict does not mirror its tree (a hook adds a key) keeps the walk."""
    import copy

    m = model()
    ema = WeightEMA(decay=0.9)
    ema.on_fit_start(None, m)
    assert ema._where is not None and len(ema._where) == len(ema.ema)
    walk = copy.deepcopy(ema)
    walk._where = None
    bn = next(mod for mod in m.net.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    name = next(k for k, mod in m.net.named_modules() if mod is bn) + ".running_mean"
    bn.running_mean = torch.full_like(bn.running_mean, 5.0)  # a new tensor object in bn._buffers
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    monkeypatch.setattr(WeightEMA, "_tracked", staticmethod(lambda pl: pytest.fail("state_dict walked")))
    ema.update(m)
    monkeypatch.undo()
    walk.update(m)
    for k in ema.ema:
        torch.testing.assert_close(ema.ema[k], walk.ema[k])
    torch.testing.assert_close(ema.ema[name], torch.full_like(bn.running_mean, 0.5))  # 0.9 * 0 + 0.1 * 5

    hooked = model()
    hooked.net._register_state_dict_hook(lambda mod, sd, prefix, meta: sd.__setitem__(prefix + "extra", torch.ones(2)))
    ema2 = WeightEMA(decay=0.5)
    ema2.on_fit_start(None, hooked)
    assert ema2._where is None and "extra" in ema2.ema
    ema2.update(hooked)
    torch.testing.assert_close(ema2.ema["extra"], torch.ones(2))


def test_checkpoint_written_during_validation_holds_trained_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    m = model(lr=0.05, lr_reference_batch=None)
    ema = WeightEMA(decay=0.9)
    ck = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc1", mode="max", filename="best")
    t = trainer(max_epochs=1, callbacks=[ema, ck], enable_checkpointing=True, limit_val_batches=1)
    t.fit(m, datamodule=TinyData())
    sd = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for k, v in m.net.state_dict().items():
        torch.testing.assert_close(sd["net." + k], v)


def test_resume_restores_ema(tmp_path):
    torch.manual_seed(0)
    m = model(lr=0.05, lr_reference_batch=None)
    ema = WeightEMA(decay=0.9)
    t = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=0, default_root_dir=tmp_path)
    t.fit(m, datamodule=TinyData())
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = {k: v.clone() for k, v in ema.ema.items()}

    ema2 = WeightEMA(decay=0.9)
    t2 = trainer(max_epochs=1, callbacks=[ema2], limit_val_batches=0, default_root_dir=tmp_path)
    t2.fit(model(lr=0.05, lr_reference_batch=None), datamodule=TinyData(), ckpt_path=tmp_path / "a.ckpt")
    assert ema2.num_updates == ema.num_updates  # max_epochs already reached: nothing more trained
    for k in saved:
        torch.testing.assert_close(ema2.ema[k], saved[k])


@pytest.mark.parametrize("kw, msg", [(dict(decay=1.0), "decay must be in"), (dict(decay=0.0), "decay must be in"),
                                     (dict(decay=-0.5), "decay must be in"), (dict(every_n_steps=0), "every_n_steps"),
                                     (dict(warmup="linear"), "warmup must be")])
def test_bad_arguments_fail_fast(kw, msg):
    with pytest.raises(ValueError, match=msg):
        WeightEMA(**kw)


class StepRecorder(ImageClassifier):
    """Records the net's float tensors after every optimizer step (independent of global_step)."""

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_steps.append({k: v.detach().clone() for k, v in self.net.state_dict().items()
                                 if v.dtype.is_floating_point})


def test_ema_moves_once_per_optimizer_step_under_accumulation():
    torch.manual_seed(0)
    m = StepRecorder(arch="convnet", num_classes=NUM_CLASSES, arch_args={"widths": [8, 16]}, lr=0.05,
                     lr_reference_batch=None, schedule="constant")
    m.after_steps = []
    init = {k: v.clone() for k, v in m.net.state_dict().items() if v.dtype.is_floating_point}
    ema = WeightEMA(decay=0.5)
    # 32 micro-batches of 2, 4 per optimizer step: 8 optimizer steps in one epoch
    t = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=0, accumulate_grad_batches=4)
    t.fit(m, datamodule=TinyData(n=64, batch_size=2))
    assert t.global_step == 8 and len(m.after_steps) == 8
    assert ema.num_updates == 8
    expected = init
    for w in m.after_steps:
        expected = {k: 0.5 * expected[k] + 0.5 * w[k] for k in expected}
    for k in expected:
        torch.testing.assert_close(ema.ema[k], expected[k])


def test_decay_warmup_forms():
    timm_ema = WeightEMA(decay=0.999, warmup="timm")
    # timm ModelEmaV3.get_decay: 1 - (1 + t/gamma) ** -power, capped at decay
    assert timm_ema.decay_at(0) == 0.0
    assert timm_ema.decay_at(7) == pytest.approx(1 - 8 ** (-2 / 3))
    assert timm_ema.decay_at(10**9) == 0.999
    tf_ema = WeightEMA(decay=0.999, warmup="tf")
    assert tf_ema.decay_at(0) == pytest.approx(0.1) and tf_ema.decay_at(10**6) == 0.999
    assert WeightEMA(decay=0.9).decay_at(0) == 0.9


def test_reset_during_warmup_epochs_keeps_ema_equal_to_weights():
    torch.manual_seed(0)
    m = model(arch_args={"widths": [8, 16]}, lr=0.05, lr_reference_batch=None)
    ema = WeightEMA(decay=0.9, reset_epochs=1)
    t = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=0)
    t.fit(m, datamodule=TinyData())
    for k, v in m.net.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(ema.ema[k], v)
    t2 = trainer(max_epochs=2, callbacks=[ema2 := WeightEMA(decay=0.9, reset_epochs=1)], limit_val_batches=0)
    t2.fit(model(arch_args={"widths": [8, 16]}, lr=0.05, lr_reference_batch=None), datamodule=TinyData())
    w = t2.lightning_module.net.state_dict()
    assert any(not torch.equal(ema2.ema[k], w[k]) for k in ema2.ema)  # averaging after the reset epochs


def test_validation_logs_trained_and_ema_accuracy():
    torch.manual_seed(0)
    m = model(arch_args={"widths": [8, 16]}, lr=0.05, lr_reference_batch=None)
    ema = WeightEMA(decay=0.9)
    t = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=2)
    t.fit(m, datamodule=TinyData())
    metrics = t.callback_metrics
    assert {"val/acc1", "val_ema/acc1", "val_ema/acc5", "val_ema/loss"} <= set(metrics)
    # recompute the EMA accuracy by hand on the same 2 batches
    import copy

    net = copy.deepcopy(m.net)
    sd = net.state_dict()
    for k, v in ema.ema.items():
        sd[k].copy_(v)
    net.eval()
    dm = TinyData()
    hits = n = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.val_dataloader()):
            if i == 2:
                break
            hits += (net(m.preprocess(x)).argmax(-1) == y).sum().item()
            n += y.numel()
    assert float(metrics["val_ema/acc1"]) == pytest.approx(hits / n)


class OrderedData(TinyData):
    """No shuffling: a resumed run sees the same batches as an uninterrupted one."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Crash("killed")


def test_ema_kill_then_resume_matches_uninterrupted(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(callbacks, ckpt=None, max_epochs=3):
        torch.manual_seed(0)
        m = model(arch_args={"widths": [8, 16]}, lr=0.05, lr_reference_batch=None)
        ema = WeightEMA(decay=0.8, warmup="tf", evaluate_with_ema=False)
        t = trainer(max_epochs=max_epochs, callbacks=[ema, *callbacks], limit_val_batches=0,
                    enable_checkpointing=True, accumulate_grad_batches=2, default_root_dir=tmp_path)
        t.fit(m, datamodule=OrderedData(), ckpt_path=ckpt)
        return ema

    full = run([])
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", filename="last", every_n_epochs=1)
    with pytest.raises(Crash):
        run([ck, CrashAt(epoch=2, batch=1)])
    resumed = run([ModelCheckpoint(dirpath=tmp_path / "ck2")], ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert (resumed.num_updates, resumed.last_step) == (full.num_updates, full.last_step) == (6, 6)
    for k, v in full.ema.items():
        torch.testing.assert_close(resumed.ema[k], v)


@pytest.mark.parametrize("kw, warns", [
    ({"decay": 0.99}, True),                     # 0.99**8 = 0.92 of the EMA is still the start
    ({"decay": 0.5}, False),                     # 0.5**8 = 0.004
    ({"decay": 0.99, "warmup": "timm"}, False),  # the warm-up's first decay is 0
    ({"decay": 0.9, "every_n_steps": 4}, True),  # 2 updates: 0.9**2 = 0.81
])
def test_ema_too_slow_for_the_fit_says_so(kw, warns, recwarn):
    """A decay whose horizon exceeds the fit leaves the EMA near the starting weights (a seed-0
    8-epoch demo with the default 0.9999: val_ema/acc1 0.17 to 0.19, near chance)."""
    torch.manual_seed(0)
    ema = WeightEMA(**kw, evaluate_with_ema=False)
    t = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=0)
    t.fit(model(arch_args={"widths": [8, 16]}), datamodule=TinyData(n=64, batch_size=8))  # 8 steps
    said = [str(w.message) for w in recwarn if "WeightEMA: decay" in str(w.message)]
    assert bool(said) == warns, said
    if warns:
        share = kw["decay"] ** (8 // kw.get("every_n_steps", 1))
        assert f"still hold {100 * share:.0f}% of the EMA" in said[0]


# ----------------------------------------------------------------------------- Dashboard cost
def test_dashboard_reuses_validation_logits_and_draws_every_n_epochs(tmp_path, monkeypatch):
    """Validation runs the network once per batch with the Dashboard on (the confusion matrix
    and mistakes come from the logits validation_step returns), and the confusion matrix is
    drawn every ``every_n_epochs``-th epoch and at the last one, not at every validation."""
    from callbacks.dashboard import Dashboard

    torch.manual_seed(0)
    m = model(lr=0.01, lr_reference_batch=None, schedule="constant")
    eval_forwards = []
    m.net.register_forward_hook(lambda mod, i, o: eval_forwards.append(1) if not mod.training else None)
    drawn = []
    dash = Dashboard(plots_dir=str(tmp_path / "plots"), every_n_epochs=2)
    orig = dash._log_confusion
    monkeypatch.setattr(dash, "_log_confusion", lambda t, cm, c, e: (drawn.append((e, int(cm.sum()))), orig(t, cm, c, e)))
    t = trainer(max_epochs=3, callbacks=[dash], limit_train_batches=1, num_sanity_val_steps=0,
                default_root_dir=tmp_path)
    data = TinyData()
    t.fit(m, datamodule=data)
    val_batches = 3 * len(data.val_dataloader())
    assert len(eval_forwards) == val_batches  # no second forward pass per validation batch
    assert drawn == [(1, len(data.x)), (2, len(data.x))]  # epochs 2 and 3 (the last) of 3, all images counted
    assert (tmp_path / "plots" / "val_confusion_matrix.png").is_file()


def test_dashboard_every_n_epochs_must_be_positive():
    from callbacks.dashboard import Dashboard

    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        Dashboard(every_n_epochs=0)


class _LossAt(L.LightningModule):
    """A linear model whose training loss is NaN from batch ``bad`` on (``None``: never)."""

    def __init__(self, bad=None):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).square().mean()
        if self.bad is not None and batch_idx >= self.bad:
            loss = loss + float("nan")  # the gradient stays finite: the weights too
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader(n=12):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randn(n, 4), torch.zeros(n)), batch_size=1)


@pytest.mark.parametrize("every,bad,stops_at", [(5, 3, 5), (1, 3, 3), (5, 6, 10), (20, 2, 12)])
def test_nonfinite_loss_check_stops_within_n_steps_and_names_the_first(every, bad, stops_at):
    """The flag is read every ``check_every_n_steps`` batches (and at the epoch's end, batch 12 here):
    the run stops at the first check after the loss went NaN, naming the first NaN step and its LR."""
    from callbacks.nonfinite import NonFiniteLossCheck

    seen = []

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch_idx)

    t = trainer(max_epochs=1, callbacks=[NonFiniteLossCheck(check_every_n_steps=every), Count()])
    with pytest.raises(FloatingPointError, match=rf"non-finite \(NaN or inf\) at step {bad}, lr 0; first non-finite: no "):
        t.fit(_LossAt(bad), train_dataloaders=_loader())
    assert len(seen) == min(stops_at + 1, 12)


def test_nonfinite_loss_check_lets_a_finite_run_finish():
    from callbacks.nonfinite import NonFiniteLossCheck

    t = trainer(max_epochs=2, callbacks=[NonFiniteLossCheck(check_every_n_steps=1)])
    t.fit(_LossAt(None), train_dataloaders=_loader())
    assert t.global_step == 24
    with pytest.raises(ValueError, match="check_every_n_steps must be >= 1"):
        NonFiniteLossCheck(check_every_n_steps=0)
