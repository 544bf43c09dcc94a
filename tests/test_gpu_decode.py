"""The GPU-decode loader (datamodules/gpu_decode.py), run on the CPU with ``device="cpu"``: the
same code as on a GPU (torchvision's CPU JPEG decoder instead of nvJPEG) against the FFCV path.
Its CUDA checks are in tests/test_gpu.py (marker ``gpu``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.folder import DataError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="ffcv is not installed")

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
# Mean absolute difference per pixel (0-255) from the FFCV path, JPEG samples decoded by the new
# path: 0.94-1.03 measured on these ramp images (train 32 and 80 px, val 40 px; 2026-12-07). It is
# the decoders': ffcv's libffcv decodes with libjpeg-turbo's fast integer IDCT (TJFLAG_FASTDCT),
# torchvision with the accurate one (OpenCV's imdecode gives torchvision's pixels exactly); the
# resample itself is within 0.05 of OpenCV's INTER_AREA on the same pixels.
MEAN_ABS_BOUND = 1.5


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> dict[str, Path]:
    """An all-JPEG and a half-raw .beton of 30 ramp images (64-100 px), and a val one."""
    from datamodules import ffcv_io
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path_factory.mktemp("gd-images"), per_class=(10, 4), size_range=(64, 100))
    out = tmp_path_factory.mktemp("gd-betons")
    paths = {"jpg": out / "jpg.beton", "mixed": out / "mixed.beton", "val": out / "val.beton"}
    for name, split, cp in (("jpg", "train", 1.0), ("mixed", "train", 0.5), ("val", "val", 1.0)):
        ffcv_io.write_beton(root / split, paths[name], max_resolution=100, compress_probability=cp, num_workers=1,
                            progress=False)
    return paths


def gpu_loader(path, res=32, train=True, share=1.0, **kw):
    from datamodules.gpu_decode import GPUDecodeLoader, Split

    kw = {"batch_size": 8, "seed": 3, "order": "random" if train else "sequential", "drop_last": train, "device": "cpu", **kw}
    return GPUDecodeLoader(path, res=res, train=train, split=Split("share", share), **kw)


def ffcv_loader(path, res=32, train=True, flip=0.5, seed=3, batch_size=8):
    from datamodules import ffcv_io

    image = (ffcv_io.train_image_pipeline(res, SCALE, RATIO, flip, seed=seed) if train
             else ffcv_io.val_image_pipeline(res, 224 / 256))
    return ffcv_io.make_loader(path, {"image": image, "label": ffcv_io.label_pipeline()}, batch_size=batch_size,
                               num_workers=1, order="random" if train else "sequential", seed=seed, drop_last=train)


def epoch(loader, number: int | None = None):
    if number is not None:
        loader.next_epoch = number
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def lr_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where the R ramp rises left to right (not flipped), -1 where it falls (tests/conftest.ramp_image)."""
    r = x[:, 0].float()
    return torch.sign(r[:, :, -4:].mean((1, 2)) - r[:, :, :4].mean((1, 2)))


@pytest.mark.slow  # ~15 s: three FFCV Loaders and two epochs of each path
@pytest.mark.parametrize("res, train", [(32, True), (80, True), (40, False)], ids=["train-32", "train-80", "val-40"])
def test_same_images_as_the_ffcv_path(betons, res, train):
    """Every batch of two epochs: the same samples in the same order, the same crops and flips,
    pixels within the decoders' difference (MEAN_ABS_BOUND). 80 px upscales some crops (OpenCV's
    linear INTER_AREA branch), 32 px downscales all (box averaging)."""
    path = betons["jpg" if train else "val"]
    ref, new = ffcv_loader(path, res, train), gpu_loader(path, res, train)
    for e in range(2):
        a, ya = epoch(ref, e)
        b, yb = epoch(new, e)
        assert torch.equal(ya, yb) and a.shape == b.shape == (len(ya), 3, res, res) and b.dtype == torch.uint8
        per_image = (a.float() - b.float()).abs().mean((1, 2, 3))
        assert per_image.mean() < MEAN_ABS_BOUND, per_image
        assert per_image.max() < 3 * MEAN_ABS_BOUND, per_image  # no image with another crop or flip
        if train:
            assert torch.equal(lr_sign(a), lr_sign(b))


def test_raw_samples_and_the_cpu_share_keep_the_cpu_path(betons):
    """Raw samples and the JPEGs left to the CPU are the FFCV path's pixels exactly; a share of 0.5
    decodes half of each batch's JPEGs with the device path."""
    from datamodules.gpu_decode import BetonSamples

    path = betons["mixed"]
    a, ya = epoch(ffcv_loader(path), 0)
    meta = BetonSamples(path).meta
    new = gpu_loader(path, share=0.5)
    b, yb = epoch(new, 0)
    assert torch.equal(ya, yb)
    order = np.concatenate([np.asarray(new.order.sample_order(0))[: len(new) * 8]])
    raw = torch.from_numpy(meta["mode"][order] != 0)
    same = (a == b).flatten(1).all(1)
    assert same[raw].all() and raw.any()  # raw: always the CPU path
    jpg_same = same[~raw]
    assert 0 < jpg_same.float().mean() < 1, jpg_same  # JPEGs: some on each path
    c, _ = epoch(gpu_loader(path, share=0.0), 0)
    assert torch.equal(a, c)  # share 0: the FFCV path's images exactly


def test_crops_and_flips_come_from_seed_epoch_and_index(betons):
    from datamodules.gpu_decode import BetonSamples, crop_table

    m = BetonSamples(betons["jpg"]).meta
    idx = np.arange(len(m))
    t = crop_table(idx, m["height"], m["width"], seed=3, epoch=1, flip=0.5)
    perm = np.random.default_rng(0).permutation(idx)
    assert np.array_equal(crop_table(perm, m["height"][perm], m["width"][perm], seed=3, epoch=1, flip=0.5), t[perm])
    assert not np.array_equal(crop_table(idx, m["height"], m["width"], seed=3, epoch=2, flip=0.5), t)
    assert not np.array_equal(crop_table(idx, m["height"], m["width"], seed=4, epoch=1, flip=0.5), t)
    # two loaders, same seed: the same batches; another epoch: other crops
    x1, y1 = epoch(gpu_loader(betons["jpg"]), 1)
    x2, y2 = epoch(gpu_loader(betons["jpg"]), 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = epoch(gpu_loader(betons["jpg"], order="sequential"), 1)
    x4, _ = epoch(gpu_loader(betons["jpg"], order="sequential"), 2)
    assert not torch.equal(x3, x4)


def test_flip_and_scale_flags_are_honoured(betons):
    from datamodules.gpu_decode import BetonSamples, crop_table

    path = betons["jpg"]
    never, _ = epoch(gpu_loader(path, flip=0.0, order="sequential"), 0)
    always, _ = epoch(gpu_loader(path, flip=1.0, order="sequential"), 0)
    assert (lr_sign(never) > 0).all() and (lr_sign(always) < 0).all()
    assert torch.equal(always, never.flip(-1))  # the flip draw does not move the crop
    m = BetonSamples(path).meta
    for lo, hi in ((0.25, 0.25), (0.6, 0.9)):
        t = crop_table(np.arange(len(m)), m["height"], m["width"], seed=0, epoch=0, scale=(lo, hi), ratio=(0.9, 1.1))
        frac = t[:, 2] * t[:, 3] / (m["height"].astype(float) * m["width"])
        assert ((frac > lo * 0.9) & (frac < hi * 1.1)).all(), frac


def test_val_is_a_center_crop(betons):
    """Validation: the FFCV path's center crop (224/256 of the short side), no flip, no randomness."""
    import cv2

    from datamodules.gpu_decode import BetonSamples

    s = BetonSamples(betons["val"])
    x, y = epoch(gpu_loader(betons["val"], res=24, train=False), 0)
    x2, _ = epoch(gpu_loader(betons["val"], res=24, train=False), 5)
    assert torch.equal(x, x2) and torch.equal(y, torch.from_numpy(s.labels))
    for n in range(len(s.meta)):
        p = int(s.meta["data_ptr"][n])
        img = cv2.cvtColor(cv2.imdecode(np.asarray(s.jpeg_bytes(np.array([n]))[0]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        c = int(224 / 256 * min(h, w))
        want = cv2.resize(img[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c], (24, 24), interpolation=cv2.INTER_AREA)
        assert np.abs(want.astype(int) - x[n].permute(1, 2, 0).numpy()).mean() < 0.5, (n, p)


def test_resample_matches_opencv_inter_area():
    """The batched resample against cv2.resize(INTER_AREA) image by image: down, up and mixed."""
    import cv2

    from datamodules.gpu_decode import plan_resample, resample

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 70), (40, 100), (33, 33), (100, 64))]
    crops = np.array([[5, 3, 80, 60, 0], [0, 10, 20, 90, 1], [1, 1, 30, 31, 0], [10, 0, 64, 64, 1]])
    for res in (16, 48):
        plan = plan_resample([i.shape[0] for i in imgs], [i.shape[1] for i in imgs], crops, res)
        flat = torch.cat([*(torch.from_numpy(i).permute(2, 0, 1).reshape(-1) for i in imgs), torch.zeros(plan.width, dtype=torch.uint8)])
        out = resample(flat, plan, res, torch.device("cpu"))
        for n, (i, j, h, w, f) in enumerate(crops):
            want = cv2.resize(imgs[n][i:i + h, j:j + w], (res, res), interpolation=cv2.INTER_AREA)
            want = want[:, ::-1] if f else want
            d = np.abs(want.astype(int) - out[n].permute(1, 2, 0).numpy())
            assert d.max() <= 1 and d.mean() < 0.1, (res, n, d.mean())


@pytest.fixture(scope="module")
def beton_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gd-dm")  # the DataModules' .beton cache, written once for the module


def dm_with_gpu_decode(tmp_path, tiny_imagenet, monkeypatch, **kw):
    """A DataModule with ``gpu_decode=1.0`` whose device path runs on the CPU (``backend.decode_device``)."""
    from datamodules.imagenet import ImageNetDataModule

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)  # the option's check at construction
        kw = {"batch_size": 6, "num_workers": 1, "train_res": 24, "val_res": 24, "gpu_decode": 1.0, **kw}
        dm = ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", max_resolution=100, beton_dir=str(tmp_path),
                                progress=False, seed=1, **kw)
    dm.backend.decode_device = "cpu"
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_progressive_resize_and_mid_epoch_resume(beton_dir, tiny_imagenet, monkeypatch):
    from datamodules.gpu_decode import GPUDecodeLoader

    tmp_path = beton_dir
    # batches of 2, one prepared ahead: a size read per batch instead of per epoch would show
    dm = dm_with_gpu_decode(tmp_path, tiny_imagenet, monkeypatch, batch_size=2, batches_ahead=1)
    loader = dm.train_dataloader()
    assert isinstance(loader, GPUDecodeLoader) and len(loader) == 9
    it = iter(loader)
    first = next(it)[0]
    dm.set_train_resolution(16)  # from the next epoch on
    assert [x.shape[-1] for x, _ in it] == [24] * 8 and first.shape[-1] == 24
    full = [x for x, _ in loader]  # epoch 1 at 16 px
    assert [x.shape[-1] for x in full] == [16] * 9
    # resume epoch 1 after its first batch: the remaining batches, same crops, the first not decoded
    state = {"epoch": 1, "batches": 1}
    resumed = dm_with_gpu_decode(tmp_path, tiny_imagenet, monkeypatch, train_res=16, batch_size=2)
    r = resumed.train_dataloader()
    r.load_state_dict(state)
    r.next_epoch = 1
    rest = [x for x, _ in r]
    assert len(rest) == 8 and all(torch.equal(a, b) for a, b in zip(rest, full[1:]))
    assert r.state_dict() == {"epoch": 1, "batches": 9}


def test_ddp_evaluation_reads_each_sample_once(beton_dir, tiny_imagenet, monkeypatch):
    tmp_path = beton_dir
    dm = dm_with_gpu_decode(tmp_path, tiny_imagenet, monkeypatch)
    whole = torch.cat([y for _, y in dm.backend.loader("val", train=False, rank=0, world_size=1)])
    shares = [torch.cat([y for _, y in dm.backend.loader("val", train=False, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(shares[0]) + len(shares[1]) == len(whole) == 9  # no padding
    assert torch.equal(shares[0], whole[0::2]) and torch.equal(shares[1], whole[1::2])


@pytest.mark.parametrize("cpu, train, share", [
    (12000, 10000, 0.0),  # the CPU keeps up with 10% to spare: all on the CPU
    (10500, 10000, 0.05),  # just short of the headroom: 1 - 10500/11000 = 4.5% -> 5%
    (5500, 10000, 0.5),  # half
    (2000, 10000, 0.85),  # 1 - 2000/11000 = 81.8% -> 85%
    (0, 10000, 1.0),
    (5000, 0, 0.0),  # no training rate measured: keep the CPU path
])
def test_split_chooser(cpu, train, share):
    from datamodules.gpu_decode import choose_share

    assert choose_share(cpu, train) == pytest.approx(share)


def test_auto_decides_from_measured_rates(betons):
    """``auto``: the CPU rate of the CPU-decoded batches against the interval between batches."""
    from datamodules.gpu_decode import GPUDecodeLoader, Split

    split = Split("auto", 0.0)
    loader = GPUDecodeLoader(betons["jpg"], batch_size=8, res=32, train=True, device="cpu", split=split)
    loader._cpu_times = [(8, 0.004)] * 16  # 2000 img/s on the CPU
    loader._decide([0.001] * 16)  # training takes a batch of 8 every ms: 8000 img/s
    assert split.share == pytest.approx(0.8) and split.decision["cpu_rate"] == pytest.approx(2000)
    assert "0.80 of the JPEGs on the device" in split.describe()
    loader._decide([0.01] * 16)  # 800 img/s: the CPU keeps up
    assert split.share == 0.0


def test_gpu_decode_option_errors_are_one_line(tiny_imagenet, monkeypatch):
    from datamodules.ffcv_io import ClosingLoader
    from datamodules.imagenet import ImageNetDataModule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for value, words in (("on", "needs a CUDA device"), (0.5, "needs a CUDA device"), ("fast", "is not a mode or a share"),
                         (1.5, "is not a mode or a share")):
        with pytest.raises(DataError) as e:
            ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", gpu_decode=value)
        assert words in str(e.value) and "\n" not in str(e.value) and "data.gpu_decode" in str(e.value)
    with pytest.raises(DataError, match="needs data.backend=ffcv"):
        ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", gpu_decode="auto")
    # auto without CUDA: the FFCV Loader
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", gpu_decode="auto", batch_size=6, num_workers=1,
                            train_res=24, val_res=24, max_resolution=100, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm.val_dataloader(), ClosingLoader)


def test_zoo_bench_gpu_runs_the_gpu_decode_part(monkeypatch):
    """`zoo bench gpu` asks benchmarks/gpu.py for its GPU-decode part (the table with the split chosen)."""
    import benchmarks.gpu
    from launch import bench

    seen = []
    monkeypatch.setattr(benchmarks.gpu, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["gpu"]) == 0 and seen == [["--gpu-decode"]]
