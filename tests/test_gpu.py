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
    from tests.helpers import REPO, tiny_data

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


# ----------------------------------------------------------------------------- JPEG decoding on the GPU


def test_gpu_decode_on_cuda_gives_the_cpu_runs_images(tmp_path):
    """datamodules/gpu_decode.py on CUDA (nvJPEG) vs the same code on the CPU and vs the FFCV path:
    same samples, crops and flips; pixels within the decoders' difference."""
    from tests.test_gpu_decode import MEAN_ABS_BOUND, epoch, ffcv_loader, gpu_loader
    from datamodules import ffcv_io
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "img", per_class=(10, 4), size_range=(64, 100))
    path = tmp_path / "jpg.beton"
    ffcv_io.write_beton(root / "train", path, max_resolution=100, compress_probability=1.0, num_workers=1, progress=False)
    for res in (32, 80):
        cuda = gpu_loader(path, res, device="cuda")
        x, y = epoch(cuda, 1)
        assert x.device.type == "cuda" and x.dtype == torch.uint8 and x.shape[-1] == res
        c, yc = epoch(gpu_loader(path, res), 1)
        a, ya = epoch(ffcv_loader(path, res), 1)
        assert torch.equal(y.cpu(), yc) and torch.equal(yc, ya)
        for ref in (c, a):
            per_image = (x.cpu().float() - ref.float()).abs().mean((1, 2, 3))
            assert per_image.mean() < MEAN_ABS_BOUND and per_image.max() < 3 * MEAN_ABS_BOUND, per_image


def test_gpu_decode_does_not_wait_for_the_device(tmp_path):
    """With ~0.5 s of work queued on the training stream, a GPU-decoded batch comes back long
    before it ends: the decode runs on a side stream and the training stream waits on an event."""
    import time

    from tests.test_gpu_decode import gpu_loader
    from datamodules import ffcv_io
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "img", per_class=(10, 4), size_range=(64, 100))
    path = tmp_path / "jpg.beton"
    ffcv_io.write_beton(root / "train", path, max_resolution=100, compress_probability=1.0, num_workers=1, progress=False)
    loader = gpu_loader(path, 32, device="cuda")
    for _ in loader:  # warm-up: nvJPEG handles, kernels, numba
        pass
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10**9)
    queued = time.perf_counter()
    it = iter(loader)
    x, y = next(it)
    host = time.perf_counter() - queued
    x.float().mean()  # the training stream's use of the batch, after its event
    torch.cuda.synchronize()
    device = time.perf_counter() - t0
    it.close()
    assert device > 0.2, f"the sleep kernel took only {device:.3f} s: the test cannot tell"
    assert host < device / 2, f"the first GPU-decoded batch held the host {host:.3f} s of a {device:.3f} s queue"


def test_fit_with_gpu_decode_on_and_auto(tiny_imagenet, tmp_path, monkeypatch):
    """A Lightning fit with data.gpu_decode=on (every JPEG on the device) and auto (the split is chosen)."""
    from datamodules import gpu_decode
    from datamodules.gpu_decode import GPUDecodeLoader
    from datamodules.imagenet import ImageNetDataModule

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(gpu_decode, "AUTO_WARMUP", 1)
    monkeypatch.setattr(gpu_decode, "AUTO_WINDOW", 2)
    for mode in ("on", "auto"):
        dm = ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", batch_size=2, num_workers=1, train_res=32,
                                val_res=32, progress=False, gpu_decode=mode, compress_probability=1.0)
        m = ImageClassifier(arch="convnet", num_classes=3, channels_last=True)
        t = trainer(accelerator="gpu", devices=1, max_epochs=2, precision="bf16-mixed", default_root_dir=str(tmp_path))
        t.fit(m, datamodule=dm)
        assert torch.isfinite(t.callback_metrics["train/loss"])
        assert isinstance(dm.train_dataloader(), GPUDecodeLoader)
        split = dm.backend.split
        assert split.share == 1.0 if mode == "on" else set(split.decision) == {"cpu_rate", "train_rate", "share"}, split


def test_preemption_handler_with_nccl_on_one_gpu(tiny_imagenet, tmp_path):
    """callbacks.preemption.SlurmRequeue under DDP with the NCCL backend, world size 1 (one Slurm
    task, started as srun would): SIGUSR1 -> the hpc checkpoint at a check step, exit 0, requeue."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import tiny_data
    from tests.test_launch import DEMO, REPO, _free_port, _srun_task_env, _wait

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = "4243"
    args = [sys.executable, "-m", "launch.cli", "fit", "--config", DEMO, *tiny_data(tiny_imagenet, batch=6),
            "--trainer.accelerator", "gpu", "--trainer.strategy", "ddp", "--trainer.devices", "1",
            "--trainer.max_epochs", "200", "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path / "runs"),
            "--run.logger", "csv", "--run.dashboard", "false",
            "--trainer.callbacks+=callbacks.preemption.SlurmRequeue", "--trainer.callbacks.check_every_n_steps=2"]
    env = {**_srun_task_env(job, 0, 1, _free_port(), bin_dir), "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    log = tmp_path / "rank0.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        # epoch 1 runs once epoch 0's last.ckpt exists (off a terminal the bar prints no "Epoch 1:")
        _wait(lambda: any((tmp_path / "runs").rglob("last.ckpt")) or proc.poll() is not None, 240,
              "the fit does not train", poll=0.05)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert "distributed_backend=nccl" in out, out[-3000:]
    hpc = tmp_path / "runs" / "convnet" / f"slurm-{job}.0" / "hpc_ckpt_1.ckpt"
    g = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert f"every rank stopped at step {g}" in out and g % 2 == 0, out[-3000:]
    assert calls.read_text().splitlines() == [f"requeue {job}"] and "Traceback" not in out
