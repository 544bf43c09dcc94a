"""WeightEMA: the average is right, evaluation uses it, checkpoints keep both, resume restores it."""

import pytest
import torch

from callbacks.ema import WeightEMA
from tests.test_base import TinyData, model, trainer


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

    ema.on_train_batch_end(T(), m, None, None, 0)
    torch.testing.assert_close(ema.ema[k], before + 0.1)


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


@pytest.mark.parametrize("kw, msg", [(dict(decay=1.0), "decay must be in"), (dict(every_n_steps=0), "every_n_steps")])
def test_bad_arguments_fail_fast(kw, msg):
    with pytest.raises(ValueError, match=msg):
        WeightEMA(**kw)
