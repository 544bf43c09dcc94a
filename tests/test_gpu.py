"""On a CUDA device: the uint8 batch is normalised on the device, channels_last, AMP, compile."""

import warnings

import lightning as L
import pytest
import torch

from tests.test_base import TinyData, model, trainer
from zoo.base import ImageClassifier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class DevicesSeen(L.Callback):
    """The devices of the module's parameters and buffers during training."""

    def __init__(self):
        self.devices = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices |= {t.device.type for t in (*pl_module.parameters(), *pl_module.buffers())}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fit_on_gpu_channels_last_amp(precision):
    m = model(channels_last=True)
    seen = DevicesSeen()
    t = trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=1, precision=precision, callbacks=[seen])
    t.fit(m, datamodule=TinyData())
    assert seen.devices == {"cuda"}  # Lightning moves the module back to the CPU at teardown
    assert torch.isfinite(t.callback_metrics["train/loss"])


@pytest.mark.slow
def test_compile_on_gpu_keeps_state_dict_keys():
    m = model(compile=True)
    trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=0).fit(m, datamodule=TinyData())
    assert not any("_orig_mod" in k for k in m.state_dict())


def test_ffcv_fit_with_ema_and_bn_check_on_gpu(tiny_imagenet, tmp_path, monkeypatch):
    """The FFCV loader, the weight EMA and the BN-statistics check (with recalibration) on a CUDA device."""
    from callbacks.bn import BNStatsCheck
    from callbacks.ema import WeightEMA
    from datamodules.imagenet import ImageNetDataModule

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", batch_size=4, num_workers=1,
                            train_res=32, val_res=32, progress=False)
    m = ImageClassifier(arch="convnet", num_classes=3, channels_last=True)
    check, seen, ema = BNStatsCheck(num_samples=8, val_samples=8, action="recalibrate"), DevicesSeen(), WeightEMA(decay=0.9)
    ema_devices = set()

    class EmaSpy(L.Callback):  # the average must live beside the weights, not cross PCIe every step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ema_devices.update(v.device.type for v in (ema.ema or {}).values())

    t = trainer(accelerator="gpu", devices=1, max_epochs=2, precision="bf16-mixed", default_root_dir=str(tmp_path),
                callbacks=[ema, check, seen, EmaSpy()])
    t.fit(m, datamodule=dm)
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert check.last_summary, "the BN check did not run"
    assert all(torch.isfinite(torch.as_tensor(v)) for v in check.last_summary.values())
    assert seen.devices == {"cuda"}
    assert ema_devices == {"cuda"}


def test_cli_fit_on_gpu(tiny_imagenet, tmp_path, monkeypatch):
    """`zoo fit` with the demo recipe and the FFCV backend on one GPU, end to end."""
    from launch.cli import main
    from tests.test_cli import REPO, tiny_data

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "cache"))
    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet, "ffcv"),
               "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
               "--trainer.num_nodes", "1", "--trainer.max_epochs", "1",
               "--run.root", str(tmp_path), "--run.logger", "csv"])
    assert rc == 0


def test_batched_auto_augment_on_gpu():
    """RandAugment/TrivialAugment keep a uint8 batch on the device, and change most images."""
    from zoo.augment import DeviceAugment

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    for policy in ("rand-m9-mstd0.5-inc1", "ta_wide"):
        out = DeviceAugment(num_classes=4, auto_augment=policy).pre_normalise(x)
        assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == x.shape
        changed = (out != x).flatten(1).any(1).float().mean().item()
        assert changed > 0.3, f"{policy}: only {changed:.0%} of images changed"


def test_auto_augment_is_masked_when_compiled_on_gpu(monkeypatch):
    from zoo.augment import BatchedAutoAugment

    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    for compile_, expected in ((True, "apply_masked"), (False, "apply")):
        aug = BatchedAutoAugment("ta_wide", compile=compile_).cuda()
        other = "apply" if expected == "apply_masked" else "apply_masked"
        monkeypatch.setattr(aug, other, lambda *a: pytest.fail(f"{other} with compile={compile_}"))
        aug(x)


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_masked_augmentation_on_gpu_gives_the_cpus_images(compile_):
    """The GPU's path (masked, eager or compiled by inductor/Triton) and the CPU's grouped path on
    the same draw: the same images up to float rounding (a grey level at a few pixels)."""
    from tests.test_augment import smooth_images
    from zoo.augment import BatchedAutoAugment

    for policy in ("rand-m9-mstd0.5-inc1", "ta_wide"):
        aug = BatchedAutoAugment(policy, compile=compile_)
        x = smooth_images(64, size=48, seed=7)
        torch.manual_seed(0)
        layers = aug.sample(64, 48, 48)
        cpu = aug.apply(x, layers)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile falls back with a warning
            gpu = aug.cuda().apply_masked(x.cuda(), layers).cpu()
        if compile_:  # compiled, not the uncompiled fallback
            assert aug._compiled is not None and aug._compiled != aug._masked
        d = (gpu.int() - cpu.int()).abs()
        assert (d > 0).float().mean() < 0.01 and d.float().mean() < 0.05, (policy, d.max(), (d > 0).float().mean())


@pytest.mark.parametrize("policy, compile_", [("rand-m9-mstd0.5-inc1", False), ("ta_wide", False),
                                              ("rand-m9-mstd0.5-inc1", True)])
def test_augmentation_does_not_wait_for_the_device(policy, compile_):
    """With ~0.5 s of work queued on the GPU, augmenting a batch returns long before it ends.

    Anything in the augmentation that waits for the device (a .item(), a boolean mask index, a
    blocking copy) would stall every training step behind the previous one's kernels.
    """
    import time

    from zoo.augment import DeviceAugment

    aug = DeviceAugment(num_classes=4, auto_augment=policy, random_erasing=0.25, mixup_alpha=0.8,
                        cutmix_alpha=1.0, compile=compile_).cuda()
    x = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 4, (64,), device="cuda")
    aug.post_normalise(aug.pre_normalise(x).float(), y)  # warm-up: kernels loaded (and compiled)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10**9)  # a spinning kernel: ~0.5 s at ~2 GHz
    queued = time.perf_counter()
    aug.post_normalise(aug.pre_normalise(x).float(), y)
    host = time.perf_counter() - queued
    torch.cuda.synchronize()
    device = time.perf_counter() - t0
    assert device > 0.2, f"the sleep kernel took only {device:.3f} s: the test cannot tell"
    assert host < device / 2, f"augmentation held the host {host:.3f} s of a {device:.3f} s queue"
