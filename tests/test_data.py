"""Data pipeline: synthetic dataset, .beton writing/caching, FFCV and torchvision loaders, errors.

ffcv loaders are built once per module (numba compiles each pipeline on its first batch).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import synthetic
from datamodules.folder import DataError, umask_mode
from datamodules.imagenet import ImageNetDataModule, count_classes

from datamodules import ffcv_io  # imports ffcv only when used

RES = 32
needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="ffcv is not installed")


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*.JPEG")):  # the manifest holds a timing
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _files(d: Path) -> list[str]:
    """Files in ``d`` but the writers' empty ``.lock`` files (ffcv_io.beton_lock: kept, as removing
    a flock'ed file races with a waiting writer)."""
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


def _written(d: Path) -> list[str]:
    """Files but the ``.beton.lock`` files that ffcv_io.beton_lock leaves on purpose (empty, reused)."""
    return [f for f in _files(d) if not f.endswith(".beton.lock")]


def _lr_sign(images: torch.Tensor) -> torch.Tensor:
    """+1 where the R ramp rises left -> right (not flipped), -1 where it falls (flipped)."""
    r = images[:, 0].float()
    w = r.shape[-1]
    return torch.sign(r[..., w // 2:].mean((1, 2)) - r[..., : w // 2].mean((1, 2)))


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of one epoch, cloned (ffcv reuses its buffers)."""
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- synthetic dataset


def test_synthetic_is_deterministic_and_a_noop_the_second_time(tmp_path):
    kw = dict(num_classes=3, train_per_class=3, val_per_class=2, size_range=(64, 96), num_workers=2)
    a = synthetic.make_synthetic_imagenet(tmp_path / "a", seed=1, **kw)
    b = synthetic.make_synthetic_imagenet(tmp_path / "b", seed=1, num_workers=0, **{k: v for k, v in kw.items() if k != "num_workers"})
    c = synthetic.make_synthetic_imagenet(tmp_path / "c", seed=2, **kw)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (a / "train").iterdir()) == synthetic.CLASSES[:3]
    assert len(list(a.rglob("*.JPEG"))) == 3 * (3 + 2)
    mtime = (a / synthetic.MANIFEST).stat().st_mtime_ns
    t = time.perf_counter()
    assert synthetic.make_synthetic_imagenet(tmp_path / "a", seed=1, **kw) == a
    assert time.perf_counter() - t < 1.0 and (a / synthetic.MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match=r"seed=1 \(asked 2\).*choose another root"):
        synthetic.make_synthetic_imagenet(tmp_path / "a", seed=2, **kw)
    assert _files(tmp_path) == ["a", "b", "c"]  # no temporary folders left


def test_synthetic_leaves_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    calls = []

    def boom(job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_one", boom)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic_imagenet(tmp_path / "s", num_classes=2, train_per_class=3, val_per_class=1, num_workers=0)
    assert _files(tmp_path) == []


def test_synthetic_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    assert synthetic.default_root() == tmp_path / "synthetic-v1"
    assert synthetic.NUM_CLASSES == len(synthetic.CLASSES) == count_classes(None) == 10
    img = synthetic.draw_image(0, np.random.default_rng(0))
    assert img.dtype == np.uint8 and img.shape[2] == 3 and 300 <= img.shape[1] <= 500


# --------------------------------------------------------------------------- #396 guard


@pytest.fixture(scope="module")
def tiny_beton(tiny_imagenet, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("betons")
    paths = {}
    for split in ("train", "val"):
        paths[split] = out / f"{split}.beton"
        ffcv_io.write_beton(tiny_imagenet / split, paths[split], max_resolution=100, jpeg_quality=90,
                            compress_probability=0.5, num_workers=2, progress=False)
    return paths


@needs_ffcv
def test_our_pipelines_pass_the_396_guard(tiny_beton):
    from ffcv.reader import Reader

    meta = Reader(str(tiny_beton["train"])).metadata
    train = ffcv_io.train_image_pipeline(RES, (0.08, 1), (3 / 4, 4 / 3))
    assert ffcv_io.pipeline_jit_modes(train, meta["f0"]) == [True, True, False, False]  # ffcv's stock ops
    seeded = ffcv_io.train_image_pipeline(RES, (0.08, 1), (3 / 4, 4 / 3), seed=0)
    assert ffcv_io.pipeline_jit_modes(seeded, meta["f0"]) == [True, False, False]  # the flip is in the decoder
    assert ffcv_io.pipeline_jit_modes(ffcv_io.val_image_pipeline(RES, 0.875), meta["f0"]) == [True, False, False]
    assert ffcv_io.pipeline_jit_modes(ffcv_io.label_pipeline(), meta["f1"]) == [True, False, False]
    for ops in (train, seeded, ffcv_io.val_image_pipeline(RES, 0.875), ffcv_io.label_pipeline()):
        ffcv_io.assert_pipeline_safe(ops)


@needs_ffcv
@pytest.mark.slow  # compiles the numba decoder: 30 s when it is the first test of a process to do so
def test_seeded_decoder_fuses_the_flip_scales_dct_and_is_cached_on_disk(tiny_imagenet, tmp_path):
    from ffcv.transforms import ToTensor, ToTorchImage

    from datamodules import ffcv_ops

    path = tmp_path / "jpeg.beton"  # all JPEG: the writer picks JPEG vs raw at random per image
    ffcv_io.write_beton(tiny_imagenet / "train", path, max_resolution=100, compress_probability=1.0, progress=False)

    def epoch(decoder, *more, os_cache=True) -> torch.Tensor:
        ld = ffcv_io.make_loader(path, {"image": [decoder, *more, ToTensor(), ToTorchImage()], "label": ffcv_io.label_pipeline()},
                                 batch_size=6, num_workers=2, order="sequential", drop_last=False, os_cache=os_cache)
        return torch.cat([x.clone() for x, _ in ld])

    def decoder(seed: ffcv_ops.EpochSeed, res: int = RES, **kw):
        return ffcv_ops.make_seeded_decoder((res, res), (0.08, 1.0), (3 / 4, 4 / 3), seed, **kw)

    shared = ffcv_ops.EpochSeed(7)
    fused = epoch(decoder(ffcv_ops.EpochSeed(7), flip=0.5))
    assert torch.equal(fused, epoch(decoder(shared), ffcv_ops.make_seeded_flip(0.5, shared)))  # same draws
    assert not torch.equal(fused, epoch(decoder(ffcv_ops.EpochSeed(7))))  # and it does flip some
    assert torch.equal(fused, epoch(decoder(ffcv_ops.EpochSeed(7), flip=0.5), os_cache=False))  # process-cache reads
    # 64-100 px JPEGs, 16 px output: crops >= 32 px decode at 1/2 size (or less): close, not equal
    full = epoch(decoder(ffcv_ops.EpochSeed(7), res=16, flip=0.5)).float()
    diff = (epoch(decoder(ffcv_ops.EpochSeed(7), res=16, flip=0.5, dct_scaling=True)).float() - full).abs().mean((1, 2, 3))
    assert 0 < (diff > 0).sum() < len(diff) and diff.max() < 12, diff
    # validation: ffcv's center crop, same pixels through the cached loop
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    assert torch.equal(epoch(CenterCropRGBImageDecoder((RES, RES), ratio=0.875)),
                       epoch(center := ffcv_ops.make_center_crop_decoder((RES, RES), 0.875)))
    assert type(ffcv_io.val_image_pipeline(RES, 0.875)[0]).__qualname__ == type(center).__qualname__
    # the decode loop is in numba's on-disk cache (a ctypes call in it would make it uncachable)
    loop = ffcv_ops._decode_batch
    assert loop.signatures and all(loop._cache.load_overload(sig, loop.targetctx) is not None for sig in loop.signatures)


@needs_ffcv
def test_crop_only_decode_gives_the_full_decodes_pixels():
    """datamodules/jpeg_region.c decodes only the rows and iMCU columns of a region: the same
    pixels as ffcv's full decode (imdecode), for 4:2:0, 4:2:2 and 4:4:4 JPEGs of odd sizes, at
    1, 1/2 and 1/4 scale, regions touching every edge included."""
    import cv2
    import ffcv.libffcv

    from datamodules import jpeg_region

    assert jpeg_region.address() is not None  # built here: the loader does use it
    region = jpeg_region._PROTO(jpeg_region.address())
    rng = np.random.default_rng(0)
    sampling = [[], [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422],
                [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]]
    for trial in range(90):
        h, w = (int(v) for v in rng.integers(17, 200, 2))
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 2)
        enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90, *sampling[trial % 3]])[1].ravel()
        for k in (1, 2, 4):
            sh, sw = -(-h // k), -(-w // k)
            full = np.zeros((sh, sw, 3), np.uint8)
            assert ffcv.libffcv.lib.imdecode(enc.ctypes.data, enc.size, h, w, full.ctypes.data, h, w, 0, 0, 1, k, 0, 0) == 0
            r0, c0 = int(rng.integers(0, sh)) if trial % 5 else 0, int(rng.integers(0, sw)) if trial % 7 else 0
            r1, c1 = int(rng.integers(r0 + 1, sh + 1)) if trial % 4 else sh, int(rng.integers(c0 + 1, sw + 1)) if trial % 6 else sw
            buf, x0 = np.zeros(sh * sw * 3, np.uint8), np.zeros(1, np.int64)
            cw = region(enc.ctypes.data, enc.size, buf.ctypes.data, buf.size, r0, r1, c0, c1, k, x0.ctypes.data)
            assert cw >= c1 - c0 and x0[0] <= c0
            got = buf[: (r1 - r0) * cw * 3].reshape(r1 - r0, cw, 3)[:, c0 - x0[0]:c1 - x0[0]]
            assert np.array_equal(got, full[r0:r1, c0:c1]), (trial, h, w, k, (r0, r1, c0, c1))
    # what the loop falls back on: -1 for a region outside the image, a short buffer, corrupt data
    buf, x0 = np.zeros(10**6, np.uint8), np.zeros(1, np.int64)
    assert region(enc.ctypes.data, enc.size, buf.ctypes.data, buf.size, 0, h + 1, 0, w, 1, x0.ctypes.data) == -1
    assert region(enc.ctypes.data, enc.size, buf.ctypes.data, 8, 0, h, 0, w, 1, x0.ctypes.data) == -1
    junk = np.frombuffer(b"\xff\xd8not a jpeg at all", np.uint8).copy()
    assert region(junk.ctypes.data, junk.size, buf.ctypes.data, buf.size, 0, 2, 0, 2, 1, x0.ctypes.data) == -1


@needs_ffcv
@pytest.mark.slow  # a fresh process compiles the whole-image decode loop: 17 s alone on the 2-core machine
def test_without_a_compiler_the_loader_warns_once_and_decodes_whole_images(tiny_imagenet, tmp_path):
    """No C compiler (a cluster node without one): one warning line, then the same batches from
    whole-image decoding (a fresh process: the decode loop links the stand-in symbol)."""
    import subprocess
    import sys

    path = tmp_path / "jpeg.beton"
    ffcv_io.write_beton(tiny_imagenet / "train", path, max_resolution=100, compress_probability=1.0, progress=False)
    script = f"""
import warnings, torch
from datamodules import ffcv_io, ffcv_ops, jpeg_region
from ffcv.transforms import ToTensor, ToTorchImage
def epoch(crop):
    dec = ffcv_ops.make_seeded_decoder(({RES}, {RES}), (0.08, 1.0), (3 / 4, 4 / 3), ffcv_ops.EpochSeed(3), crop_decode=crop)
    ld = ffcv_io.make_loader({str(path)!r}, {{"image": [dec, ToTensor(), ToTorchImage()], "label": ffcv_io.label_pipeline()}},
                             batch_size=6, num_workers=2, order="sequential", drop_last=False)
    return torch.cat([x.clone() for x, _ in ld])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    got = epoch(None)
print("available", ffcv_ops.crop_decode_available(), "warnings", sum("crop-only JPEG decoding unavailable" in str(x.message) for x in w))
torch.save(got, {str(tmp_path / "got.pt")!r})
"""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "ZOO_DATA_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("ZOO_JPEG_REGION_LIB", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "available False warnings 1" in r.stdout, (r.stdout, r.stderr[-2000:])
    from ffcv.transforms import ToTensor, ToTorchImage

    from datamodules import ffcv_ops

    dec = ffcv_ops.make_seeded_decoder((RES, RES), (0.08, 1.0), (3 / 4, 4 / 3), ffcv_ops.EpochSeed(3))
    ld = ffcv_io.make_loader(path, {"image": [dec, ToTensor(), ToTorchImage()], "label": ffcv_io.label_pipeline()},
                             batch_size=6, num_workers=2, order="sequential", drop_last=False)
    assert torch.equal(torch.load(tmp_path / "got.pt", weights_only=True), torch.cat([x.clone() for x, _ in ld]))


@needs_ffcv
@pytest.mark.slow  # compiles the crop-only decode loop in this process: 21 s alone on the 2-core machine
def test_loader_with_crop_only_decode_gives_the_same_batches(tiny_imagenet, tmp_path, monkeypatch):
    """The train decoder (random crops, with and without DCT scaling) and the validation center
    crop give the same batches with crop-only decoding on and off (``ZOO_CROP_DECODE=0``)."""
    from ffcv.transforms import ToTensor, ToTorchImage

    from datamodules import ffcv_ops

    path = tmp_path / "jpeg.beton"
    ffcv_io.write_beton(tiny_imagenet / "train", path, max_resolution=100, compress_probability=1.0, progress=False)

    def epoch(decoder) -> torch.Tensor:
        ld = ffcv_io.make_loader(path, {"image": [decoder, ToTensor(), ToTorchImage()], "label": ffcv_io.label_pipeline()},
                                 batch_size=6, num_workers=2, order="sequential", drop_last=False)
        return torch.cat([x.clone() for x, _ in ld])

    def decoders():
        return [ffcv_ops.make_seeded_decoder((RES, RES), (0.08, 1.0), (3 / 4, 4 / 3), ffcv_ops.EpochSeed(3), flip=0.5),
                ffcv_ops.make_seeded_decoder((16, 16), (0.08, 1.0), (3 / 4, 4 / 3), ffcv_ops.EpochSeed(3), dct_scaling=True),
                ffcv_ops.make_center_crop_decoder((RES, RES), 0.875)]

    assert ffcv_ops.crop_decode_available()
    on = [epoch(d) for d in decoders()]
    monkeypatch.setenv("ZOO_CROP_DECODE", "0")
    assert not ffcv_ops.crop_decode_available()
    off = [epoch(d) for d in decoders()]
    for a, b in zip(on, off):
        assert torch.equal(a, b)


@needs_ffcv
def test_396_pipeline_is_rejected_instead_of_hanging(tiny_beton):
    from ffcv.transforms import NormalizeImage

    mean, std = np.array([124.0, 116.0, 104.0]), np.array([58.0, 57.0, 57.0])
    bad = ffcv_io.val_image_pipeline(RES, 0.875) + [NormalizeImage(mean, std, np.float32)]
    assert ffcv_io.pipeline_jit_modes(bad) == [True, False, False, True]
    with pytest.raises(DataError, match=r"NormalizeImage.*after ToTensor.*libffcv/ffcv#396"):
        ffcv_io.assert_pipeline_safe(bad)
    result: list = []

    def build():
        try:
            ffcv_io.make_loader(tiny_beton["val"], {"image": bad, "label": ffcv_io.label_pipeline()},
                                batch_size=4, num_workers=1, order="sequential")
        except DataError as e:
            result.append(e)

    t = threading.Thread(target=build, daemon=True)  # a regression would hang: don't take pytest down
    t.start()
    t.join(60)
    assert not t.is_alive(), "make_loader hangs on a jitted -> not jitted -> jitted pipeline"
    assert result and "#396" in str(result[0])


# --------------------------------------------------------------------------- ffcv loaders


@pytest.fixture(scope="module")
def ffcv_dm(tiny_imagenet, tmp_path_factory):
    dm = ImageNetDataModule(
        root=str(tiny_imagenet), backend="ffcv", batch_size=8, num_workers=2, train_res=RES, val_res=RES,
        max_resolution=100, beton_dir=str(tmp_path_factory.mktemp("dm-betons")), progress=False, drop_last=False,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@needs_ffcv
def test_ffcv_batches_are_uint8_nchw_with_labels(ffcv_dm):
    assert ffcv_dm.num_classes == 3 and ffcv_dm.classes == ["ant", "bee", "cat"]
    for loader, n in ((ffcv_dm.train_dataloader(), 18), (ffcv_dm.val_dataloader(), 9)):
        x, y = _epoch(loader)
        assert x.dtype == torch.uint8 and x.shape == (n, 3, RES, RES)
        assert y.dtype == torch.int64 and y.shape == (n,)
        assert sorted(y.tolist()) == sorted([0, 1, 2] * (n // 3))
        # the B channel encodes the label: images and labels stay paired
        assert torch.equal((x[:, 2].float().mean((1, 2)) - 40).div(80).round().long(), y)


@needs_ffcv
def test_ffcv_train_flips_and_crops_val_is_a_fixed_center_crop(ffcv_dm):
    signs = torch.cat([_lr_sign(_epoch(ffcv_dm.train_dataloader())[0]) for _ in range(3)])
    assert (signs > 0).any() and (signs < 0).any(), "RandomHorizontalFlip never (or always) flipped"
    v1, y1 = _epoch(ffcv_dm.val_dataloader())
    v2, y2 = _epoch(ffcv_dm.val_dataloader())
    assert torch.equal(v1, v2) and torch.equal(y1, y2)
    assert (_lr_sign(v1) > 0).all(), "validation must not flip"
    # Same images in sequential order: random crops differ from the center crop.
    seq = ffcv_io.make_loader(
        ffcv_dm.beton_path("val"),
        {"image": ffcv_io.train_image_pipeline(RES, (0.08, 1.0), (3 / 4, 4 / 3)), "label": ffcv_io.label_pipeline()},
        batch_size=9, num_workers=1, order="sequential", drop_last=False,
    )
    t, ty = _epoch(seq)
    assert torch.equal(ty, y1)
    unflipped = torch.where((_lr_sign(t) < 0)[:, None, None, None], t.flip(-1), t)
    diff = (unflipped.float() - v1.float()).abs().mean((1, 2, 3))
    assert (diff > 4).float().mean() > 0.5, f"train crops look like center crops: {diff}"


@needs_ffcv
def test_ffcv_set_train_resolution_on_a_built_loader(ffcv_dm):
    loader = ffcv_dm.train_dataloader()
    try:
        ffcv_dm.set_train_resolution(48)
        assert ffcv_dm.train_dataloader() is loader  # no rebuild, no recompile
        t = time.perf_counter()
        assert _epoch(loader)[0].shape[-2:] == (48, 48)
        assert time.perf_counter() - t < 5
    finally:
        ffcv_dm.set_train_resolution(RES)
    assert _epoch(loader)[0].shape[-2:] == (RES, RES)


@needs_ffcv
def test_ffcv_dct_scaling_option_reaches_the_train_decoder(tiny_imagenet, tmp_path):
    res = 16  # all-JPEG .beton of 64-100 px images: crops of >= 32 px decode at 1/2 size (or less)

    def make(dct: bool) -> ImageNetDataModule:
        dm = ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", batch_size=6, num_workers=2, train_res=res,
                                val_res=res, max_resolution=100, compress_probability=1.0, beton_dir=str(tmp_path),
                                progress=False, drop_last=False, seed=5, dct_scaling=dct)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    dm = make(False)
    full, labels = _epoch(dm.train_dataloader())
    del dm
    gc.collect()  # its Loader is free in ffcv_io.LOADER_POOL now: only a reuse key without the option would hand it out
    built = ffcv_io.LOADER_POOL.built
    dm = make(True)
    loader = dm.train_dataloader()
    assert ffcv_io.LOADER_POOL.built == built + 1 and loader.ops["image"][0].dct_scaling
    x, y = _epoch(loader)
    assert x.dtype == torch.uint8 and x.shape == (18, 3, res, res) and torch.equal(y, labels)  # same order
    diff = (x.float() - full.float()).abs().mean((1, 2, 3))
    assert (diff > 0).sum() >= 3 and diff.mean() < 3, diff  # other pixels, same crops: a few grey levels apart
    # the torchvision backend ignores it, as it does the other ffcv options
    assert ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", dct_scaling=True).hparams.dct_scaling


@needs_ffcv
def test_backends_agree_on_validation_crops(ffcv_dm, tiny_imagenet):
    tv = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=9, num_workers=0,
                            train_res=RES, val_res=RES)
    tv.prepare_data()
    tv.setup("validate")
    a, ya = _epoch(ffcv_dm.val_dataloader())
    b, yb = _epoch(tv.val_dataloader())
    assert torch.equal(ya, yb)
    # OpenCV INTER_AREA (ffcv) vs PIL bilinear, JPEG vs raw storage: close, not equal
    assert (a.float() - b.float()).abs().mean() < 6


@needs_ffcv
@pytest.mark.slow
def test_lightning_fits_on_ffcv_loaders(ffcv_dm):
    import lightning as L

    # this fit's epoch threads, not those of loaders an earlier test of the session left to the gc
    gc.collect()
    before = {t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * RES * RES, 3))
            self.seen: list[tuple] = []

        def training_step(self, batch, _):
            x, y = batch
            self.seen.append((x.dtype, tuple(x.shape)))
            return torch.nn.functional.cross_entropy(self.net(x.float() / 255), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val/loss", torch.nn.functional.cross_entropy(self.net(x.float() / 255), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    loader = ffcv_dm.train_dataloader()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=ffcv_dm)
    assert model.seen and all(s == (torch.uint8, (8, 3, RES, RES)) for s in model.seen[:2])
    assert len(model.seen) == 2 * 3  # 18 images / 8 per batch, last partial batch kept
    assert loader.next_epoch == 2  # Lightning's iter() checks did not start (and leak) ffcv epochs
    assert "val/loss" in trainer.callback_metrics
    gc.collect()
    assert not [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator" and t not in before]


# --------------------------------------------------------------------------- torchvision backend


def test_torchvision_batches_flips_crops_and_determinism(tiny_imagenet):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=6, num_workers=0,
                            train_res=RES, val_res=RES, drop_last=False)
    dm.prepare_data()
    dm.setup("fit")
    x, y = _epoch(dm.train_dataloader())
    assert x.dtype == torch.uint8 and x.shape == (18, 3, RES, RES) and x.is_contiguous()
    assert y.dtype == torch.int64 and sorted(y.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    signs = torch.cat([_lr_sign(_epoch(dm.train_dataloader())[0]) for _ in range(3)])
    assert (signs > 0).any() and (signs < 0).any()
    v1, _ = _epoch(dm.val_dataloader())
    v2, _ = _epoch(dm.val_dataloader())
    assert torch.equal(v1, v2) and (_lr_sign(v1) > 0).all()
    dm.set_train_resolution(40)
    assert _epoch(dm.train_dataloader())[0].shape[-2:] == (40, 40)


def test_torchvision_loaders_share_one_packed_sample_table_per_split(tiny_imagenet, monkeypatch):
    """A loader built again (the backend drops its loaders at the end of each fit, so a fit and
    then a validate or a second fit build new ones) reuses its split's packed table: packing
    ImageNet's train split takes ~0.56 s."""
    from datamodules import torchvision_backend as tvb

    packed = []
    init = tvb.PackedSamples.__init__
    monkeypatch.setattr(tvb.PackedSamples, "__init__", lambda self, samples: (packed.append(len(samples)), init(self, samples))[1])
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=6, num_workers=0,
                            train_res=RES, val_res=RES)
    dm.prepare_data()
    dm.setup("fit")
    first = dm.train_dataloader()
    dm.teardown("fit")
    second = dm.train_dataloader()
    val = dm.val_dataloader()
    assert first is not second and _epoch(second)[0].shape[0] == 18
    assert sorted(packed) == sorted([18, len(val.dataset)])  # once per split
    assert first.dataset.samples is second.dataset.samples


@pytest.mark.slow
def test_torchvision_resolution_reaches_persistent_workers(tiny_imagenet):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=6, num_workers=1,
                            train_res=RES, val_res=RES)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    assert next(iter(loader))[0].shape[-1] == RES
    dm.set_train_resolution(40)  # between epochs, as ProgressiveResize does
    assert all(x.shape[-1] == 40 for x, _ in loader)
    dm.teardown("fit")


def test_worker_start_method_avoids_fork_on_pythons_with_the_head_lock_deadlock(monkeypatch):
    """python/cpython#112275: fork children can deadlock before 3.11.10 / 3.10.15; 3.12 never did."""
    from datamodules.processes import workers as tvb

    assert tvb.fork_may_deadlock((3, 11, 7)) and tvb.fork_may_deadlock((3, 10, 14)) and tvb.fork_may_deadlock((3, 9, 18))
    assert not any(tvb.fork_may_deadlock(v) for v in [(3, 11, 10), (3, 11, 14), (3, 10, 15), (3, 12, 1), (3, 13, 0)])
    monkeypatch.delenv(tvb.WORKER_START_ENV, raising=False)
    monkeypatch.setattr(tvb, "fork_may_deadlock", lambda: True)
    assert tvb.worker_start_method() is None  # one process: no process group, no gloo threads
    monkeypatch.setattr(tvb, "_distributed", lambda: True)
    assert tvb.worker_start_method() == "forkserver"
    monkeypatch.setattr(tvb, "fork_may_deadlock", lambda: False)
    assert tvb.worker_start_method() is None
    monkeypatch.setenv(tvb.WORKER_START_ENV, "fork")
    assert tvb.worker_start_method() == "fork"
    monkeypatch.setenv(tvb.WORKER_START_ENV, "vfork")
    with pytest.raises(DataError, match="ZOO_WORKER_START='vfork': use one of"):
        tvb.worker_start_method()


def test_packed_samples_round_trip_and_pickle_small():
    """The torchvision datasets' sample table: same (path, label) pairs, also for undecodable
    bytes in a file name (surrogateescape, as os.fsdecode gives them), and a pickle that is the
    arrays (0.14 s instead of 1.4 s for ImageNet's 1.28M samples), not one object per sample."""
    import pickle

    from datamodules.torchvision_backend import PackedSamples

    samples = [(f"/data/train/n{c:03d}/img_{i}.JPEG", c) for c in range(50) for i in range(40)]
    samples += [("/data/caf\u00e9/\udcff.jpg", 7), ("", 0)]
    packed = pickle.loads(pickle.dumps(PackedSamples(samples)))
    assert len(packed) == len(samples) and [packed[i] for i in range(len(samples))] == samples
    assert len(PackedSamples([])) == 0


# --------------------------------------------------------------------------- caching


@needs_ffcv
def test_beton_cache_is_reused_and_keyed_by_write_params(tiny_imagenet, tmp_path):
    kw = dict(root=str(tiny_imagenet), batch_size=4, num_workers=1, beton_dir=str(tmp_path), progress=False)
    dm = ImageNetDataModule(max_resolution=64, **kw)
    dm.prepare_data()
    path = dm.beton_path("train")
    assert path.name == "train_64_0.50_90.beton" and ffcv_io.read_sidecar(path)["num_samples"] == 18
    mtimes = [(p, p.stat().st_mtime_ns) for p in tmp_path.iterdir()]
    ImageNetDataModule(max_resolution=64, **kw).prepare_data()
    assert [(p, p.stat().st_mtime_ns) for p in tmp_path.iterdir()] == mtimes
    ImageNetDataModule(max_resolution=80, compress_probability=1.0, **kw).prepare_data()
    assert "train_80_1.00_90.beton" in _files(tmp_path) and [(p, p.stat().st_mtime_ns) for p, _ in mtimes] == mtimes
    assert not [f for f in _files(tmp_path) if f.endswith(".tmp") or f.startswith(".")]


@needs_ffcv
def test_given_beton_with_other_write_params_is_a_clear_error(tiny_beton, tmp_path):
    for split in ("train", "val"):
        for suffix in ("", ".json"):
            shutil.copy(f"{tiny_beton[split]}{suffix}", tmp_path / f"{split}.beton{suffix}")
    assert count_classes(str(tmp_path)) == 3
    ok = ImageNetDataModule(root=str(tmp_path), max_resolution=100, batch_size=4, progress=False)
    ok.prepare_data()
    assert ok.beton_path("val") == tmp_path / "val.beton"
    with pytest.raises(DataError, match=r"train.beton was written with max_resolution=100 but the data options ask "
                                        r"for max_resolution=256: set data.max_resolution"):
        ImageNetDataModule(root=str(tmp_path), max_resolution=256, batch_size=4).prepare_data()
    with pytest.raises(DataError, match="compress_probability=0.5 but .* compress_probability=1.0"):
        ffcv_io.check_beton(tmp_path / "train.beton", ffcv_io.WriteParams(100, 90, 1.0))


# --------------------------------------------------------------------------- bad inputs


def _prepare(root, backend="ffcv", **kw):
    dm = ImageNetDataModule(root=str(root), backend=backend, batch_size=4, num_workers=1, progress=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("backend", [pytest.param("ffcv", marks=needs_ffcv), "torchvision"])
def test_bad_folders_raise_one_clear_line(image_folder, tmp_path, backend):
    cases = []
    cases.append((tmp_path / "nope", r"data root .*nope' does not exist: pass the folder"))
    no_val = image_folder()
    shutil.rmtree(no_val / "val")
    cases.append((no_val, r"has no val/ folder: .* must hold train/<class>"))
    mismatch = image_folder()
    (mismatch / "val" / "bee").rename(mismatch / "val" / "bea")
    cases.append((mismatch, r"val/ classes differ from train/ classes \(missing in val/: bee; only in val/: bea\)"))
    empty = image_folder()
    for f in (empty / "train" / "cat").iterdir():
        f.unlink()
    cases.append((empty, r"class folder .*train/cat has no image files .*: add images or remove the folder"))
    for root, pattern in cases:
        with pytest.raises(DataError, match=pattern) as err:
            _prepare(root, backend, beton_dir=str(tmp_path / "betons"))
        assert "\n" not in str(err.value)
    assert _written(tmp_path / "betons") == []  # nothing half-written


@needs_ffcv
def test_corrupt_image_fails_naming_it_or_is_skipped(image_folder, tmp_path):
    root = image_folder()
    bad = root / "train" / "bee" / "bee_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG: header fine, data cut
    (root / "val" / "ant" / "notes.jpg").write_text("not an image")
    betons = tmp_path / "betons"
    with pytest.raises(DataError, match=r"cannot read image .*bee_2.JPEG .*set data.skip_corrupt=true"):
        _prepare(root, beton_dir=str(betons))
    assert _written(betons) == []  # the tmp file is gone
    with pytest.warns(UserWarning) as rec:
        dm = _prepare(root, beton_dir=str(betons), skip_corrupt=True)
    messages = "\n".join(str(w.message) for w in rec)
    assert "train: skipped 1 unreadable images (e.g. " in messages and "bee_2.JPEG)" in messages
    assert "val: skipped 1 unreadable images" in messages and "notes.jpg)" in messages
    assert ffcv_io.read_sidecar(dm.beton_path("train"))["num_samples"] == 17
    assert ffcv_io.read_sidecar(dm.beton_path("val"))["skipped"][0][0].endswith("notes.jpg")
    assert not [f for f in _written(betons) if not f.endswith((".beton", ".json"))]


def test_corrupt_image_torchvision(image_folder):
    root = image_folder()
    (root / "val" / "ant" / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read image .*notes.jpg"):
        _prepare(root, "torchvision")
    with pytest.warns(UserWarning, match=r"val: skipping 1 unreadable images"):
        dm = _prepare(root, "torchvision", skip_corrupt=True)
    assert len(dm.val_dataloader().dataset) == 9
    # a truncated file passes the header check and fails when decoded, naming the file
    bad = root / "train" / "cat" / "cat_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    ds = dm.train_dataloader().dataset
    i = next(i for i, (p, _) in enumerate(ds.samples) if p == str(bad))
    ds.skip_corrupt = False
    with pytest.raises(DataError, match=r"cannot read image .*cat_0.JPEG"):
        ds[i]
    ds.skip_corrupt = True
    with pytest.warns(UserWarning, match="skipping cannot read image"):
        assert ds[i][1] == ds.samples[i + 1][1]


def test_batch_size_must_divide_by_world_size(tiny_imagenet):
    # drop_last=False: 18 train images are fewer than one batch of 64 per process (a DataError of its own)
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=256, drop_last=False)
    dm.prepare_data()
    dm.trainer = SimpleNamespace(world_size=3, current_epoch=0)
    with pytest.raises(DataError, match=r"batch_size=256 does not divide by world_size=3 processes: use a multiple of 3 "
                                        r"\(e.g. 255 or 258\)"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=4, current_epoch=0)
    dm.setup("fit")
    assert dm.per_device_batch_size == 64


def test_every_process_gets_a_val_image(tiny_imagenet):
    """9 val images: 16 processes would leave 7 without any (Lightning's loop then fails an assert)."""
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=16)
    dm.prepare_data()
    dm.trainer = SimpleNamespace(world_size=16, global_rank=0, current_epoch=0)
    for stage in ("fit", "validate", "test"):
        with pytest.raises(DataError, match=r"^the val split has 9 image\(s\) for 16 processes: .* use at most 9 devices"):
            dm.setup(stage)
    dm.trainer = SimpleNamespace(world_size=16, global_rank=0, current_epoch=0, limit_val_batches=0)
    dm.setup("fit")  # a fit without validation needs no val image per process
    dm.trainer = SimpleNamespace(world_size=8, global_rank=0, current_epoch=0)
    dm.setup("fit")


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (dict(scale=(0.5, 0.2)), r"scale=\(0.5, 0.2\) must satisfy"),
        (dict(val_crop_ratio=1.5), r"val_crop_ratio=1.5 must be in \(0, 1\]"),
        (dict(jpeg_quality=0), r"jpeg_quality=0 is out of range"),
        (dict(backend="dali"), r"backend='dali' is unknown"),
        (dict(order="quasi_random"), None),
    ],
)
def test_bad_options(kw, pattern):
    kw = {"backend": "torchvision", **kw}
    if pattern is None:  # valid at init; quasi_random + os_cache is caught when the loader is built
        ImageNetDataModule(**kw)
        return
    with pytest.raises(DataError, match=pattern):
        ImageNetDataModule(**kw)


@needs_ffcv
def test_quasi_random_needs_process_cache(tiny_beton):
    with pytest.raises(DataError, match="quasi_random' needs os_cache=False"):
        ffcv_io.make_loader(tiny_beton["train"], {}, batch_size=4, num_workers=1, order="quasi_random")


def test_data_config_gives_resolution_defaults():
    dm = ImageNetDataModule(backend="torchvision", data_config={"input_size": (3, 288, 288), "crop_pct": 0.95, "interpolation": "bicubic"})
    assert (dm.train_resolution, dm.val_resolution, dm.val_crop, dm.interpolation) == (288, 288, 0.95, "bicubic")
    dm = ImageNetDataModule(backend="torchvision", train_res=160, data_config={"input_size": 224})
    assert (dm.train_resolution, dm.val_resolution, dm.val_crop) == (160, 224, 224 / 256)


@needs_ffcv
def test_write_beton_from_a_dataset(tmp_path):
    class DS:
        classes = ["x", "y"]

        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 3:
                raise OSError("disk on fire")
            return np.full((20 + i, 30, 3), i * 10, np.uint8), i % 2

    with pytest.raises(DataError, match=r"cannot read image dataset\[3\] \(OSError: disk on fire\)"):
        ffcv_io.write_beton(DS(), tmp_path / "d.beton", max_resolution=64, jpeg_quality=90, compress_probability=0.0,
                            num_workers=1, progress=False)
    assert _files(tmp_path) == []
    meta = ffcv_io.write_beton(DS(), tmp_path / "d.beton", max_resolution=64, jpeg_quality=90,
                               compress_probability=0.0, num_workers=1, progress=False, skip_corrupt=True)
    assert meta["num_samples"] == 4 and meta["classes"] == ["x", "y"] and len(meta["skipped"]) == 1
    assert ffcv_io.beton_info(tmp_path / "d.beton") == {"num_samples": 4, "fields": ["image", "label"], "num_classes": 2}
    assert os.stat(tmp_path / "d.beton").st_mode & 0o777 == umask_mode()  # not mkstemp's 0600


# --------------------------------------------------------------------------- flip


@pytest.mark.parametrize("backend", [pytest.param("ffcv", marks=needs_ffcv), "torchvision"])
def test_flip_zero_never_flips(tiny_imagenet, tmp_path, backend):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend=backend, batch_size=6, num_workers=1 if backend == "ffcv" else 0,
                            train_res=RES, val_res=RES, max_resolution=100, beton_dir=str(tmp_path), progress=False,
                            drop_last=False, flip=0.0, scale=(0.5, 1.0))
    dm.prepare_data()
    dm.setup("fit")
    signs = torch.cat([_lr_sign(_epoch(dm.train_dataloader())[0]) for _ in range(3)])
    assert (signs > 0).all(), f"flip=0 flipped {(signs < 0).sum().item()} of {len(signs)} crops"
    with pytest.raises(DataError, match=r"flip=1.5 must be a probability"):
        ImageNetDataModule(root=str(tiny_imagenet), backend=backend, flip=1.5)


# --------------------------------------------------------------------------- train_per_class
@pytest.mark.parametrize("backend", [pytest.param("ffcv", marks=[needs_ffcv, pytest.mark.slow]), "torchvision"])
def test_train_per_class_reads_n_images_of_each_class(tiny_imagenet, tmp_path, backend):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend=backend, batch_size=3, num_workers=1 if backend == "ffcv" else 0,
                            train_res=RES, val_res=RES, max_resolution=100, beton_dir=str(tmp_path), progress=False,
                            drop_last=False, train_per_class=2, seed=5)
    dm.prepare_data()
    dm.setup("fit")
    _, y = _epoch(dm.train_dataloader())
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]  # 2 of the 6 per class, every epoch
    _, y2 = _epoch(dm.train_dataloader())
    assert sorted(y2.tolist()) == [0, 0, 1, 1, 2, 2]
    _, yv = _epoch(dm.val_dataloader())
    assert len(yv) == 9  # val untouched


def test_train_per_class_subset_is_the_same_on_every_backend_and_rank(tiny_imagenet, tmp_path):
    from datamodules.samplers import per_class_subset

    def dm(**kw):
        return ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=2, num_workers=0,
                                  train_res=RES, val_res=RES, drop_last=False, train_per_class=2, seed=5, **kw)

    tv = dm()
    tv.prepare_data()
    tv.setup("fit")
    labels = tv.backend._samples["train"].labels
    idx = tv.train_subset(labels)
    assert sorted(np.bincount(labels[idx]).tolist()) == [2, 2, 2]
    assert np.array_equal(idx, per_class_subset(labels, 2, 5))  # a function of labels and seed only
    assert not np.array_equal(idx, per_class_subset(labels, 2, 6))  # another seed, another subset
    if importlib.util.find_spec("ffcv") is not None:
        from datamodules.ffcv_io import beton_labels

        fv = ImageNetDataModule(root=str(tiny_imagenet), backend="ffcv", batch_size=2, num_workers=1, train_res=RES,
                                val_res=RES, max_resolution=100, beton_dir=str(tmp_path), progress=False,
                                train_per_class=2, seed=5)
        fv.prepare_data()
        # the .beton is written in the split's order: the same indices are the same images
        assert np.array_equal(fv.train_subset(beton_labels(fv.beton_path("train"))), idx)
    # two ranks: each reads its share of the same subset, together all of it
    picked = [tv.backend._samples["train"][int(i)] for i in idx]
    seen = []
    for rank in (0, 1):
        loader = tv.backend.loader("train", train=True, rank=rank, world_size=2)
        seen += [loader.dataset.samples[i] for i, _ in loader.sampler]
    assert sorted(set(seen)) == sorted(picked)
    with pytest.raises(DataError, match=r"train_per_class=1 keeps 3 train images, fewer than one batch of 4"):
        d = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=4, num_workers=0,
                               train_res=RES, val_res=RES, train_per_class=1)
        d.prepare_data()
        d.setup("fit")
        d.train_dataloader()
    with pytest.raises(DataError, match=r"train_per_class=0 must be a whole number >= 1"):
        ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", train_per_class=0)
