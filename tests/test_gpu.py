"""On a CUDA device: the uint8 batch is normalised on the device, channels_last, AMP, compile."""

import pytest
import torch

from tests.test_base import TinyData, model, trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fit_on_gpu_channels_last_amp(precision):
    m = model(channels_last=True)
    t = trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=1, precision=precision)
    t.fit(m, datamodule=TinyData())
    assert m.pixel_mean.device.type == "cuda"
    assert torch.isfinite(t.callback_metrics["train/loss"])


@pytest.mark.slow
def test_compile_on_gpu_keeps_state_dict_keys():
    m = model(compile=True)
    trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=0).fit(m, datamodule=TinyData())
    assert not any("_orig_mod" in k for k in m.state_dict())
