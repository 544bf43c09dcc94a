"""Batched RandAugment / TrivialAugment against the implementations the recipes cite.

Each kernel is compared with timm's PIL op or torchvision's op on the same images and
arguments; the sampled policies are compared with timm's ``rand_augment_transform`` and
torchvision's ``TrivialAugmentWide`` by their statistics on the same inputs (fixed seeds,
tolerances of 4+ binomial standard deviations).
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zoo import augment as A
from zoo.augment import BatchedAutoAugment, Policy, kernels, masked

timm_aa = pytest.importorskip("timm.data.auto_augment")
from torchvision.transforms import InterpolationMode, v2  # noqa: E402

MEAN_FILL = (124, 116, 104)  # round(255 * IMAGENET_DEFAULT_MEAN), timm's img_mean


def smooth_images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Natural-ish uint8 images: upsampled noise in 30..220 (so AutoContrast/Solarize act)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (30 + 190 * x).round().to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def one_op(aug: BatchedAutoAugment, x: torch.Tensor, op: int, arg: float) -> torch.Tensor:
    n = x.shape[0]
    return aug.apply(x, [(torch.full((n,), op), torch.full((n,), float(arg)))])


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# (our op, timm op name, timm argument, our argument) at M=9 (level 0.9), both signs
TIMM_CASES = [
    (A.AUTOCONTRAST, "AutoContrast", (), 0),
    (A.EQUALIZE, "Equalize", (), 0),
    (A.INVERT, "Invert", (), 0),
    (A.ROTATE, "Rotate", (27.0,), 27.0),
    (A.ROTATE, "Rotate", (-27.0,), -27.0),
    (A.POSTERIZE, "PosterizeIncreasing", (1,), 1),
    (A.SOLARIZE, "SolarizeIncreasing", (26,), 26),
    (A.SOLARIZE_ADD, "SolarizeAdd", (99,), 99),
    (A.COLOR, "ColorIncreasing", (1.81,), 1.81),
    (A.CONTRAST, "ContrastIncreasing", (0.19,), 0.19),
    (A.BRIGHTNESS, "BrightnessIncreasing", (1.81,), 1.81),
    (A.SHARPNESS, "SharpnessIncreasing", (0.19,), 0.19),
    (A.SHARPNESS, "SharpnessIncreasing", (1.81,), 1.81),
    (A.SHEAR_X, "ShearX", (0.27,), 0.27),
    (A.SHEAR_Y, "ShearY", (-0.27,), -0.27),
    (A.TRANSLATE_X, "TranslateXRel", (0.405,), 0.405 * 40),
    (A.TRANSLATE_Y, "TranslateYRel", (-0.405,), -0.405 * 40),
]


@pytest.mark.parametrize("op, name, timm_args, arg", TIMM_CASES, ids=[f"{c[1]}{c[3]}" for c in TIMM_CASES])
def test_each_kernel_matches_timms_pil_op(op, name, timm_args, arg):
    x = smooth_images(8)
    aug = BatchedAutoAugment("rand-m9-mstd0.5-inc1", interpolation="bilinear")
    ours = one_op(aug, x, op, arg)
    kw = dict(fillcolor=MEAN_FILL, resample=Image.Resampling.BILINEAR)
    ref = torch.stack([from_pil(timm_aa.NAME_TO_OP[name](to_pil(img), *timm_args, **kw)) for img in x])
    # colour ops agree to rounding; warps differ at the border where PIL fills whole pixels
    tol = 2.5 if op < A.N_AFFINE else 0.6
    assert mean_abs(ours, ref) < tol, f"{name}: mean |ours - timm| = {mean_abs(ours, ref):.2f}"
    assert mean_abs(ours, x) > 0.3  # the op did something


# (our op, torchvision op name, torchvision magnitude, our argument)
TV_CASES = [
    (A.SHEAR_X, "ShearX", 0.66, 0.66),
    (A.SHEAR_Y, "ShearY", -0.33, -0.33),
    (A.TRANSLATE_X, "TranslateX", 9.0, -9.0),
    (A.TRANSLATE_Y, "TranslateY", -14.0, 14.0),
    (A.ROTATE, "Rotate", 81.0, 81.0),
    (A.BRIGHTNESS, "Brightness", -0.66, 0.34),
    (A.COLOR, "Color", 0.99, 1.99),
    (A.CONTRAST, "Contrast", 0.5, 1.5),
    (A.SHARPNESS, "Sharpness", 0.9, 1.9),
    (A.POSTERIZE, "Posterize", 3, 3),
    (A.SOLARIZE, "Solarize", 0.6, 0.6 * 255),
    (A.AUTOCONTRAST, "AutoContrast", 0.0, 0),
    (A.EQUALIZE, "Equalize", 0.0, 0),
]


@pytest.mark.parametrize("op, name, mag, arg", TV_CASES, ids=[c[1] for c in TV_CASES])
def test_each_kernel_matches_torchvision_trivialaugment_op(op, name, mag, arg):
    x = smooth_images(8)
    aug = BatchedAutoAugment("ta_wide")
    ours = one_op(aug, x, op, arg)
    ta = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    ref = torch.stack([ta._apply_image_or_video_transform(img, name, mag, ta.interpolation, ta._fill) for img in x])
    tol = 2.5 if op < A.N_AFFINE else 1.0  # torchvision truncates blends where we round
    assert mean_abs(ours, ref) < tol, f"{name}: mean |ours - torchvision| = {mean_abs(ours, ref):.2f}"


def _stats(out: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Fraction of images left unchanged, mean |change| (grey levels) of the changed ones."""
    d = (out.float() - x.float()).abs().flatten(1).mean(1)
    changed = d > 0
    return 1 - changed.float().mean().item(), d[changed].mean().item()


N_STAT = 400


def test_randaugment_statistics_match_timm():
    """timm's rand-m9-mstd0.5-inc1 leaves ~1/4 of the images unchanged (2 ops at p=0.5);
    torchvision's RandAugment (both ops always, ~2x stronger) would fail both checks."""
    x = smooth_images(N_STAT, size=32, seed=1)
    torch.manual_seed(0)
    ours = BatchedAutoAugment("rand-m9-mstd0.5-inc1")(x)
    random.seed(0)
    np.random.seed(0)
    ref_t = timm_aa.rand_augment_transform(
        "rand-m9-mstd0.5-inc1",
        dict(translate_const=int(32 * 0.45), img_mean=MEAN_FILL, interpolation=Image.Resampling.BICUBIC),
    )
    ref = torch.stack([from_pil(ref_t(to_pil(img))) for img in x])
    (u_ours, d_ours), (u_ref, d_ref) = _stats(ours, x), _stats(ref, x)
    sd = (2 * u_ref * (1 - u_ref) / N_STAT) ** 0.5
    assert abs(u_ours - u_ref) < 4 * sd + 0.01, (u_ours, u_ref)
    assert 0.15 < u_ref < 0.35  # the reference itself: 0.25 + ops without effect
    assert abs(d_ours - d_ref) < 0.2 * d_ref, (d_ours, d_ref)


def test_trivialaugment_statistics_match_torchvision():
    x = smooth_images(N_STAT, size=32, seed=2)
    torch.manual_seed(0)
    ours = BatchedAutoAugment("ta_wide")(x)
    torch.manual_seed(1)
    ta = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    ref = torch.stack([ta(img) for img in x])
    (u_ours, d_ours), (u_ref, d_ref) = _stats(ours, x), _stats(ref, x)
    sd = (2 * max(u_ref, 0.05) * (1 - u_ref) / N_STAT) ** 0.5
    assert abs(u_ours - u_ref) < 4 * sd + 0.01, (u_ours, u_ref)
    assert abs(d_ours - d_ref) < 0.2 * d_ref, (d_ours, d_ref)


def test_timm_sampler_draws_ops_probabilities_and_magnitudes_as_timm():
    torch.manual_seed(0)
    aug = BatchedAutoAugment("rand-m9-mstd0.5-inc1")
    layers = aug.sample(20000, 32, 32)
    assert len(layers) == 2
    ops, arg = layers[0]
    applied = ops != A.SKIP
    assert abs(applied.float().mean().item() - 0.5) < 0.02  # each op with p=0.5
    freq = torch.bincount(ops[applied], minlength=A.IDENTITY)[list(A.TIMM_INC_OPS)].float() / applied.sum()
    assert (freq - 1 / 15).abs().max() < 0.015  # uniform over the 15 increasing ops
    level = arg[ops == A.ROTATE].abs() / 30 * 10  # magnitude back from the angle
    assert abs(level.mean().item() - 9.0) < 0.05 and abs(level.std().item() - 0.5) < 0.05
    assert (arg[ops == A.ROTATE] < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("policy", ["ta_wide", "rand-m9-mstd0.5-inc1"])  # fill 0 / mean colour; bilinear / bicubic
def test_whole_pixel_translations_shift_exactly_as_the_warp(policy):
    aug = BatchedAutoAugment(policy)
    x = smooth_images(24, size=36)
    for op in (A.TRANSLATE_X, A.TRANSLATE_Y):
        ops, arg = torch.full((24,), op), torch.arange(-12.0, 12.0) * 3  # shifts past the border included
        warped = kernels.to_uint8(aug._warp(x.float(), kernels.theta(ops, arg, 36, 36)))
        assert torch.equal(aug.apply(x, [(ops, arg)]), warped)  # the shift path
        frac = arg + 0.5  # not whole pixels: the warp path, a different image
        assert not torch.equal(aug.apply(x, [(ops, frac)]), warped)


def test_batched_augment_is_per_sample_and_reproducible():
    x = smooth_images(1).repeat(32, 1, 1, 1)
    aug = BatchedAutoAugment("ta_wide")
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert torch.equal(a, b)
    assert len({o.flatten()[:200].numpy().tobytes() for o in a}) > 8  # different ops per sample


@pytest.mark.parametrize(
    "name, msg",
    [("autoaugment", "unknown auto_augment"), ("rand-m9-inc0", "increasing"), ("rand-m9-mstd101-inc1", "uniform")],
)
def test_bad_policy_names(name, msg):
    with pytest.raises(ValueError, match=msg):
        Policy.parse(name)


def test_legacy_names_map_to_the_recipes_variants():
    assert Policy.parse("randaugment", 7) == Policy.parse("rand-m7-mstd0.5-inc1")
    assert Policy.parse("trivialaugment").kind == "ta_wide"
    assert Policy.parse("rand-m9-mstd0.5-inc1") == Policy("timm_rand", 2, 9.0, 0.5, 0.5, "bicubic")


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "ta_wide"])
def test_masked_path_gives_the_grouped_paths_images(policy):
    """The GPU's fixed-shape path (cheap ops on the whole batch, each sample keeping its own;
    warps and Equalize on gathered slots) and the CPU's grouped path give the same images for
    the same draw: whole-pixel shifts, warps, colour and integer ops, skipped layers."""
    aug = BatchedAutoAugment(policy)
    x = smooth_images(256, size=32, seed=5)
    torch.manual_seed(0)
    layers = aug.sample(256, 32, 32)
    grouped = aug.apply(x, layers)
    assert (grouped != x).flatten(1).any(1).float().mean() > 0.5  # the draw changes most images
    assert torch.equal(aug.apply_masked(x, layers), grouped)  # warps and Equalize on gathered slots
    aug.capacity = lambda n, group: n  # slots as large as the batch (the layout of an overflowing draw)
    assert torch.equal(aug.apply_masked(x, layers), grouped)


def test_auto_impl_picks_the_grouped_path_on_a_cpu(monkeypatch):
    """auto: masked only when compiled on CUDA (tests/test_gpu.py); grouped on a CPU, compiled or not."""
    for compile_ in (False, True):
        aug = BatchedAutoAugment("ta_wide", compile=compile_)
        monkeypatch.setattr(aug, "apply_masked", lambda *a: pytest.fail("masked path on a CPU"))
        aug(smooth_images(4))
    with pytest.raises(ValueError, match="use auto, grouped or masked"):
        BatchedAutoAugment("ta_wide", impl="fast")


@pytest.mark.slow
def test_compiled_masked_path_gives_the_same_images_with_one_compile():
    """torch.compile (inductor, CPU here; tests/test_gpu.py on a GPU) fuses the masked path: the
    same images up to float rounding (fused arithmetic flips a rounding at a pixel or two), and one
    graph for every draw and every instance (slot sizes that followed the draw recompiled at nearly
    every step on a GPU, and dynamo stops compiling a function after 8 recompiles)."""
    from torch._dynamo.utils import counters

    aug = BatchedAutoAugment("rand-m9-mstd0.5-inc1", impl="masked", compile=True)
    x = smooth_images(64, size=32, seed=6)
    graphs = counters["stats"]["unique_graphs"]
    warps = set()
    for seed in range(6):
        torch.manual_seed(seed)
        layers = aug.sample(64, 32, 32)
        warps |= {int((ops < A.N_AFFINE).sum()) for ops, _ in layers}
        d = (aug.apply_masked(x, layers).int() - aug.apply(x, layers).int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (seed, d.max(), (d > 0).float().mean())
    assert len(warps) >= 3  # the draws differed in how many samples warp
    twin = BatchedAutoAugment("rand-m9-mstd0.5-inc1", impl="masked", compile=True)  # a new model, a new fit
    twin(x)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph for every draw and instance
    assert aug._compiled != aug._masked and twin._compiled != twin._masked  # not the fallback


def test_a_masked_path_that_fails_to_compile_runs_uncompiled_with_a_warning(monkeypatch):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("backend compiler failed\ndetails")
        return call

    aug = BatchedAutoAugment("rand-m9-mstd0.5-inc1", impl="masked", compile=True)
    monkeypatch.setattr(torch, "compile", broken)
    x = smooth_images(16, size=16, seed=3)
    torch.manual_seed(0)
    layers = aug.sample(16, 16, 16)
    with pytest.warns(RuntimeWarning, match=r"compile of the masked path failed \(RuntimeError: backend compiler failed\); it runs uncompiled"):
        out = aug.apply_masked(x, layers)
    assert torch.equal(out, aug.apply(x, layers))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls: uncompiled, no new warning
        assert torch.equal(aug.apply_masked(x, layers), out)


def test_a_draw_that_overflows_a_slot_runs_uncompiled_with_the_same_images(monkeypatch):
    aug = BatchedAutoAugment("rand-m9-mstd0.5-inc1", impl="masked", compile=True)
    monkeypatch.setattr(aug, "capacity", lambda n, group: 2)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled for an overflowing draw"))
    x = smooth_images(64, size=32, seed=6)
    torch.manual_seed(0)
    layers = aug.sample(64, 32, 32)
    assert torch.equal(aug.apply_masked(x, layers), aug.apply(x, layers))


def test_slot_capacity_covers_the_binomial_tail():
    """Each slot overflows with odds below 1e-9 (exact binomial tail, in rational arithmetic),
    and one multiple of 8 less would not: the capacity is the smallest that is safe."""
    from fractions import Fraction
    from math import comb

    def overflow(n, p, c):  # P(Binomial(n, p) > c), exactly
        return sum(comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(c + 1, n + 1))

    for policy, p_warp, p_one in (("rand-m9-mstd0.5-inc1", Fraction(5, 30), Fraction(1, 30)),
                                  ("ta_wide", Fraction(5, 14), Fraction(1, 14))):
        aug = BatchedAutoAugment(policy)
        for n in (4, 32, 128, 256):
            for group, p in (("warp", p_warp), ("equalize", p_one), ("contrast", p_one), ("autocontrast", p_one)):
                cap = aug.capacity(n, group)
                assert cap == n or (cap % 8 == 0 and overflow(n, p, cap) < Fraction(1, 10**9)), (policy, n, group)
                assert cap <= 8 or overflow(n, p, cap - 8) >= Fraction(1, 10**9), (policy, n, group, cap)
        assert aug.capacity(128, "equalize") < aug.capacity(128, "warp") < 128  # the slots do save work


def test_slots_gather_the_members_padded():
    members = torch.tensor([3, 7, 11, 30, 31, 32, 33, 34, 35])
    idx, pos = masked.slot_indices(members, 40, 16)
    assert idx.numel() == 16 and idx[:9].tolist() == members.tolist() and (idx[9:] == 0).all()
    assert (idx[pos[members]] == members).all()


@pytest.mark.parametrize(
    "kw", [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0), dict(mixup_alpha=0.8, cutmix_alpha=1.0)],
    ids=["mixup", "cutmix", "both"],
)
def test_mixup_cutmix_give_torchvisions_batches(kw):
    """The fixed-shape mixing of a compiled step (mixing.mix_params on the CPU, mixing.mix on the
    device) draws its numbers as v2.RandomChoice([MixUp, CutMix]) does: with the same seed, the
    same images and soft targets, to the bit. An eager step runs torchvision's transforms, and
    erasing before the mix keeps the draws in the same order."""
    from zoo.augment import DeviceAugment, mixing

    ours = DeviceAugment(10, **kw)
    erasing = DeviceAugment(10, random_erasing=0.5, erase_mode="zero", **kw)
    mixers = [cls(alpha=kw[k], num_classes=10) for cls, k in ((v2.MixUp, "mixup_alpha"), (v2.CutMix, "cutmix_alpha"))
              if k in kw]
    ref = v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0]
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        x, y = torch.randn(8, 3, 16, 20, generator=g), torch.randint(0, 10, (8,), generator=g)
        torch.manual_seed(seed)
        xa, ya = mixing.mix(x, y, mixing.mix_params(ours.mixers, 16, 20), 10)
        torch.manual_seed(seed)
        xb, yb = ref(x, y)
        assert torch.equal(xa, xb) and torch.equal(ya, yb), seed
        torch.manual_seed(seed)
        xc, yc = ours.post_normalise(x, y)
        assert torch.equal(xc, xb) and torch.equal(yc, yb), seed
        # eager vs the fixed-shape path (the compiled step's) with erasing on
        torch.manual_seed(seed)
        xd, yd = erasing.post_normalise(x, y)
        torch.manual_seed(seed)
        n = x.shape[0]
        packed = torch.cat([A.erase_params(n, 16, 20, 0.5).flatten(), mixing.mix_params(erasing.mixers, 16, 20)])
        xe, ye = erasing._post(x, y, packed)
        assert torch.equal(xd, xe) and torch.equal(yd, ye), seed


def test_erasing_boxes_follow_the_probability_and_area():
    from zoo.augment import erase_params

    torch.manual_seed(0)
    top, bottom, left, right = erase_params(4000, 32, 48, 0.25)
    area = (bottom - top) * (right - left) / (32 * 48)
    on = area > 0
    assert abs(on.float().mean().item() - 0.25) < 0.03
    assert area[on].min() >= 0.015 and area[on].max() <= 1 / 3 + 0.05
    assert (top >= 0).all() and (bottom <= 32).all() and (left >= 0).all() and (right <= 48).all()


def test_copies_leave_the_compiled_functions_out():
    """A compiled bound method would call the original module (its fill colour, its device): copies
    and pickles drop it and compile their own on first use."""
    import copy
    import pickle

    from zoo.augment import DeviceAugment

    aug = DeviceAugment(4, mixup_alpha=0.8, auto_augment="ta_wide", compile=True)
    aug._compiled_post = aug.auto._compiled = lambda *a: None  # stand-ins: compiling takes seconds
    for twin in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        assert twin._compiled_post is None and twin.auto._compiled is None and twin.compile
