"""Weight loading: every source format and key layout, and the errors a user can cause.

Nothing is downloaded: published checkpoints are imitated by saving randomly filled
torchvision / timm / official-layout networks, and hub ids are tried offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import urllib.error

import pytest
import torch
import torchvision.models as tvm
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zoo import heads, registry
from zoo.weights import LoadReport, WeightsError, export_safetensors, load_weights


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every float tensor of the state (parameters and BN statistics) with random values,
    so that a key loaded into the wrong place changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if not v.dtype.is_floating_point:
                continue
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif v.ndim > 1 and "layer_scale" not in k:  # conv / linear: fan-in scale
                v.copy_(torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel()))
            elif k.endswith("weight"):  # norm scales
                v.copy_(1 + 0.2 * torch.randn(v.shape, generator=g))
            else:  # biases, running means, layer scales
                v.copy_(0.2 * torch.randn(v.shape, generator=g))
    return net.eval()


def fast_random(builder, **kw) -> nn.Module:
    """Build on the meta device (skips the slow init of big nets), then fill randomly."""
    with torch.device("meta"):
        net = builder(**kw)
    return randomize(net.to_empty(device="cpu"))


def empty(name: str, **kw) -> nn.Module:
    """A registry network with uninitialised memory: a cheap target for weights that overwrite
    every tensor (a key left unloaded shows up as garbage logits)."""
    with torch.device("meta"):
        net = registry.create_network(name, **kw)
    return net.to_empty(device="cpu")


def logits(net: nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        y = net.eval()(x)
    assert torch.isfinite(y).all() and y.std() > 0
    return y


def first_line(e: pytest.ExceptionInfo) -> str:
    return str(e.value).splitlines()[0]


# ----------------------------------------------------------------------------- torchvision files


def test_torchvision_resnet50_state_dict(tmp_path):
    src = fast_random(tvm.resnet50)
    torch.save(src.state_dict(), tmp_path / "resnet50.pth")
    net = registry.create_network("resnet50")  # the real builder (0.5 s)
    rep = load_weights(net, tmp_path / "resnet50.pth", arch="resnet50")
    assert isinstance(rep, LoadReport) and rep.format == "state_dict"
    assert rep.loaded == len(src.state_dict()) and rep.layout is None and rep.head_reset is None
    torch.testing.assert_close(logits(net), logits(src), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tv_convnext():
    return fast_random(tvm.convnext_tiny)


@pytest.fixture(scope="module")
def tv_convnext_logits(tv_convnext):
    return logits(tv_convnext)


def test_torchvision_convnext_tiny_state_dict(tmp_path, tv_convnext, tv_convnext_logits):
    torch.save(tv_convnext.state_dict(), tmp_path / "convnext_tiny-983f1562.pth")
    net = empty("convnext_tiny")
    rep = load_weights(net, tmp_path / "convnext_tiny-983f1562.pth", arch="convnext_tiny")
    assert rep.layout == "torchvision ConvNeXt -> timm"
    assert rep.loaded == len(tv_convnext.state_dict())
    torch.testing.assert_close(logits(net), tv_convnext_logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def timm_convnext_sd(tv_convnext):
    """The torchvision network's weights in timm's layout (checked against timm's module below)."""
    net = empty("convnext_tiny")
    load_weights(net, tv_convnext.state_dict(), arch="convnext_tiny")
    return net.state_dict()


def test_timm_convnext_state_dict_and_back_to_torchvision(tmp_path, timm_convnext_sd, tv_convnext_logits):
    import timm

    with torch.device("meta"):
        timm_net = timm.create_model("convnext_tiny", pretrained=False)
    timm_net = timm_net.to_empty(device="cpu")
    timm_net.load_state_dict(timm_convnext_sd)  # timm's own module takes the keys as they are
    torch.testing.assert_close(logits(timm_net), tv_convnext_logits, atol=1e-5, rtol=0)
    torch.save(timm_net.state_dict(), tmp_path / "timm.pth")
    net = empty("convnext_tiny")
    assert load_weights(net, tmp_path / "timm.pth").layout is None
    torch.testing.assert_close(logits(net), tv_convnext_logits, atol=1e-5, rtol=0)
    # and the other way: timm layout into a torchvision ConvNeXt
    tv_net = fast_random(tvm.convnext_tiny)
    rep = load_weights(tv_net, tmp_path / "timm.pth", arch="torchvision convnext_tiny")
    assert rep.layout == "timm ConvNeXt -> torchvision"
    torch.testing.assert_close(logits(tv_net), tv_convnext_logits, atol=1e-5, rtol=0)


def _timm_to_official(sd: dict) -> dict:
    """Inverse of timm's checkpoint_filter_fn: the key layout of facebookresearch/ConvNeXt
    (downsample_layers.*, stages.S.B.{dwconv,norm,pwconv1,pwconv2,gamma}, norm, head)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = re.sub(r"^head\.norm\.", "norm.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def test_official_convnext_checkpoint(tmp_path, timm_convnext_sd, tv_convnext_logits):
    from timm.models.convnext import checkpoint_filter_fn

    timm_sd = timm_convnext_sd
    official = _timm_to_official(timm_sd)
    assert "downsample_layers.0.0.weight" in official and "stages.2.8.pwconv2.weight" in official
    assert "head.weight" in official and "norm.weight" in official
    # the inverse is right: timm's own converter maps it back to the same keys
    net = empty("convnext_tiny")
    assert set(checkpoint_filter_fn({"model": official}, net)) == set(timm_sd)
    torch.save({"model": official, "epoch": 299}, tmp_path / "convnext_tiny_1k_224_ema.pth")
    rep = load_weights(net, tmp_path / "convnext_tiny_1k_224_ema.pth", arch="convnext_tiny")
    assert rep.layout == "official ConvNeXt -> timm" and rep.format == "checkpoint"
    torch.testing.assert_close(logits(net), tv_convnext_logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- prefixes, containers


def test_wrapper_prefixes_are_stripped(tmp_path):
    src = randomize(registry.create_network("convnet", num_classes=10))
    sd = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "ddp_compiled.pt")
    net = registry.create_network("convnet", num_classes=10)
    rep = load_weights(net, tmp_path / "ddp_compiled.pt", arch="convnet")
    assert rep.stripped == ("module.", "_orig_mod.")
    torch.testing.assert_close(logits(net), logits(src), atol=0, rtol=0)
    # a model.-prefixed LightningModule state_dict, as a plain dict in memory
    net2 = registry.create_network("convnet", num_classes=10)
    rep = load_weights(net2, {f"model.{k}": v for k, v in src.state_dict().items()})
    assert rep.stripped == ("model.",)
    torch.testing.assert_close(logits(net2), logits(src), atol=0, rtol=0)


def test_timm_train_checkpoint_prefers_ema(tmp_path):
    a = randomize(registry.create_network("convnet", num_classes=10), seed=1)
    b = randomize(registry.create_network("convnet", num_classes=10), seed=2)
    ckpt = {
        "epoch": 3, "arch": "convnet", "state_dict": a.state_dict(), "state_dict_ema": b.state_dict(),
        "args": argparse.Namespace(model="convnet", lr=0.1, data_dir=pathlib.Path("/data")),  # as train.py saves
    }
    torch.save(ckpt, tmp_path / "checkpoint-3.pth.tar")
    net = registry.create_network("convnet", num_classes=10)
    assert load_weights(net, tmp_path / "checkpoint-3.pth.tar").ema
    torch.testing.assert_close(logits(net), logits(b), atol=0, rtol=0)
    assert not load_weights(net, tmp_path / "checkpoint-3.pth.tar", use_ema=False).ema
    torch.testing.assert_close(logits(net), logits(a), atol=0, rtol=0)


# ----------------------------------------------------------------------------- safetensors, HF folders


def test_safetensors_round_trip_with_metadata(tmp_path):
    src = randomize(registry.create_network("mlp", num_classes=5, depth=2, width=16, input_size=8))
    path = export_safetensors(src, tmp_path / "mlp.safetensors", arch="mlp", arch_args={"depth": 2, "width": 16, "input_size": 8})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "mlp" and meta["num_classes"] == "5"
    assert json.loads(meta["arch_args"]) == {"depth": 2, "width": 16, "input_size": 8}
    assert json.loads(meta["data_config"])["input_size"] == 224  # the entry's config
    net = registry.create_network("mlp", num_classes=5, depth=2, width=16, input_size=8)
    rep = load_weights(net, path, arch="mlp")
    assert rep.format == "safetensors" and rep.arch == "mlp" and rep.num_classes == 5
    assert rep.data_config == registry.get_data_config("mlp")
    torch.testing.assert_close(logits(net, 8), logits(src, 8), atol=0, rtol=0)


def test_hf_folder_written_by_export(tmp_path):
    src = randomize(registry.create_network("convnet", num_classes=3))
    folder = export_safetensors(src, tmp_path / "hf", arch="convnet")
    assert (folder / "model.safetensors").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "convnet" and cfg["num_classes"] == 3
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64]
    net = registry.create_network("convnet", num_classes=3)
    rep = load_weights(net, folder, arch="convnet")
    assert rep.format == "hf-folder" and rep.arch == "convnet"
    torch.testing.assert_close(logits(net), logits(src), atol=0, rtol=0)


@pytest.mark.parametrize("fname", ["model.safetensors", "pytorch_model.bin"])
def test_timm_hub_snapshot_folder(tmp_path, fname, timm_convnext_sd, tv_convnext_logits):
    """The layout of hf-hub:timm/convnext_tiny.* snapshots (timm's push_to_hub)."""
    sd = timm_convnext_sd
    if fname.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / fname))
    else:
        torch.save(sd, tmp_path / fname)
    pretrained_cfg = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic",
                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000}
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "convnext_tiny", "num_classes": 1000, "num_features": 768, "pretrained_cfg": pretrained_cfg}))
    net = empty("convnext_tiny")
    rep = load_weights(net, tmp_path, arch="convnext_tiny")
    assert rep.arch == "timm/convnext_tiny" and rep.num_classes == 1000
    assert rep.data_config.crop_pct == 0.875 and rep.data_config.interpolation == "bicubic"
    torch.testing.assert_close(logits(net), tv_convnext_logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- every family


ROUND_TRIP = [  # one network per family; both formats where it is cheap
    ("logreg", {"input_size": 8}, 8, "pth"),
    ("logreg", {"input_size": 8}, 8, "safetensors"),
    ("mlp", {"input_size": 8, "width": 16, "norm": "batchnorm"}, 8, "pth"),
    ("mlp", {"input_size": 8, "width": 16, "norm": "layernorm", "skip": True}, 8, "safetensors"),
    ("convnet", {"skip": True, "depths": 2}, 32, "pth"),
    ("convnet", {"downsample": "maxpool"}, 32, "safetensors"),
    ("resnet18", {}, 32, "pth"),
    ("convnext_tiny", {}, 32, "safetensors"),
    ("timm/resnet18", {}, 32, "safetensors"),
]


@pytest.mark.parametrize(
    "name,args,size,fmt", ROUND_TRIP, ids=[f"{c[0]}-{c[3]}" for c in ROUND_TRIP]
)
def test_round_trip_every_family(tmp_path, name, args, size, fmt):
    src = fast_random(registry.get_entry(name).builder, num_classes=6, **args)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(src.state_dict(), path)
    else:
        export_safetensors(src, path, arch=name, arch_args=args)
    net = empty(name, num_classes=6, **args)
    rep = load_weights(net, path, arch=name)
    assert rep.loaded == len(src.state_dict())
    torch.testing.assert_close(logits(net, size), logits(src, size), atol=0, rtol=0)


# ----------------------------------------------------------------------------- heads


def test_head_reset_when_num_classes_differs(tmp_path):
    src = fast_random(tvm.resnet18)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    net = registry.create_network("resnet18", num_classes=10)
    head_before = net.fc.weight.clone()
    rep = load_weights(net, tmp_path / "r18.pth", arch="resnet18")
    assert rep.head_reset == (1000, 10)
    assert "head not loaded: weights have 1000 classes, model 10" in str(rep)
    assert torch.equal(net.fc.weight, head_before)  # the new head keeps its init
    assert torch.equal(net.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert rep.loaded == len(src.state_dict()) - 2


def test_weights_without_a_head(tmp_path):
    src = randomize(registry.create_network("convnet", num_classes=0))
    torch.save(src.state_dict(), tmp_path / "features.pth")
    net = registry.create_network("convnet", num_classes=4)
    rep = load_weights(net, tmp_path / "features.pth")
    assert rep.head_reset == (None, 4)


# ----------------------------------------------------------------------------- errors


def test_other_architecture_is_a_clear_error(tmp_path):
    torch.save(fast_random(tvm.resnet18).state_dict(), tmp_path / "r18.pth")
    net = empty("resnet50")
    with pytest.raises(WeightsError) as e:
        load_weights(net, tmp_path / "r18.pth", arch="resnet50")
    line = first_line(e)
    assert line.startswith(f"weights {tmp_path / 'r18.pth'} do not fit resnet50:")
    assert "missing" in line and "another architecture" in line
    assert re.search(r"\d+ missing keys", line)
    assert "\n  missing (" in str(e.value)  # then the first few keys of each kind


def test_safetensors_metadata_names_the_source_architecture(tmp_path):
    export_safetensors(empty("resnet18"), tmp_path / "r18.safetensors", arch="resnet18")
    with pytest.raises(WeightsError, match=r"another architecture \(they say resnet18\)"):
        load_weights(empty("convnext_tiny"), tmp_path / "r18.safetensors", arch="convnext_tiny")


def test_small_mismatch_suggests_arch_args_or_non_strict(tmp_path):
    src = registry.create_network("convnet", num_classes=10, depths=(1, 1, 1, 2))
    torch.save(src.state_dict(), tmp_path / "c.pth")
    net = registry.create_network("convnet", num_classes=10)
    with pytest.raises(WeightsError, match="arch_args"):
        load_weights(net, tmp_path / "c.pth", arch="convnet")
    rep = load_weights(net, tmp_path / "c.pth", arch="convnet", strict=False)
    assert rep.unexpected and not rep.missing
    assert torch.equal(net.stages[0][0].conv.weight, src.stages[0][0].conv.weight)


# A pickle that runs code: tests/test_security.py (every loading path, the message).


def test_whole_pickled_module_is_refused(tmp_path):
    torch.save(registry.create_network("convnet"), tmp_path / "model.pt")  # torch.save(model)
    with pytest.raises(WeightsError, match="contains pickled Python objects"):
        load_weights(registry.create_network("convnet"), tmp_path / "model.pt")


def test_not_a_weights_file(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(WeightsError, match="not a readable"):
        load_weights(registry.create_network("convnet"), tmp_path / "notes.pth")


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_weights(registry.create_network("convnet"), tmp_path / "nope.ckpt")
    assert str(e.value) == f"weights file {tmp_path / 'nope.ckpt'} not found"


def test_empty_folder(tmp_path):
    with pytest.raises(WeightsError, match="holds no weights: expected model.safetensors or pytorch_model.bin"):
        load_weights(registry.create_network("convnet"), tmp_path)


def test_hf_hub_offline_is_one_clear_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as e:
        load_weights(registry.create_network("convnet"), "hf-hub:zoo-tests/does-not-exist")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot fetch hf-hub:zoo-tests/does-not-exist from the Hugging Face hub (offline mode")
    assert "--local-dir" in msg


def test_torchvision_hub_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as e:
        load_weights(registry.create_network("resnet50"), "torchvision:ResNet50_Weights.IMAGENET1K_V2")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot download torchvision:ResNet50_Weights.IMAGENET1K_V2 from https://")
    assert str(tmp_path) in msg  # where to put the file by hand
    with pytest.raises(WeightsError, match="torchvision has no such weights"):
        load_weights(registry.create_network("resnet50"), "torchvision:ResNet50_Weights.NOPE")


def test_torchvision_hub_reads_the_cache(monkeypatch, tmp_path):
    """With the file in torch.hub's cache, a torchvision id loads offline, with its eval config."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    w = tvm.ResNet18_Weights.IMAGENET1K_V1
    src = fast_random(tvm.resnet18)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(src.state_dict(), cache / pathlib.Path(w.url).name)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloads"))
    net = registry.create_network("resnet18")
    rep = load_weights(net, "torchvision:ResNet18_Weights.IMAGENET1K_V1", arch="resnet18")
    assert rep.arch == "resnet18" and rep.num_classes == 1000 and rep.format == "torchvision-hub"
    # 224 / 256, bilinear; and the weights' class names (w.meta["categories"])
    assert dataclasses.replace(rep.data_config, label_names=None) == registry.get_data_config("resnet18")
    assert rep.data_config.label_names[:2] == ("tench", "goldfish") and len(rep.data_config.label_names) == 1000
    torch.testing.assert_close(logits(net), logits(src), atol=0, rtol=0)


# ----------------------------------------------------------------------------- ImageClassifier level


@pytest.fixture
def base():
    # only these tests need the LightningModule (an import error fails them, never skips them)
    import zoo.base

    return zoo.base


def _lightning_like_ckpt(model, ema_net=None) -> dict:
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "callbacks": {},
    }
    if ema_net is not None:
        ema = {k: v for k, v in ema_net.state_dict().items() if v.dtype.is_floating_point}
        ckpt["callbacks"]["WeightEMA{'decay': 0.9999}"] = {"decay": 0.9999, "num_updates": 10, "ema_state_dict": ema}
    return ckpt


def test_load_rebuilds_from_lightning_checkpoint_with_ema(base, tmp_path):
    import zoo

    arch_args = {"depth": 1, "width": 8, "input_size": 8}
    model = base.ImageClassifier(arch="mlp", num_classes=3, arch_args=arch_args, lr=0.05)
    randomize(model.net, seed=1)
    ema_net = randomize(registry.create_network("mlp", num_classes=3, **arch_args), seed=2)
    torch.save(_lightning_like_ckpt(model, ema_net), tmp_path / "last.ckpt")

    loaded = zoo.load(weights=tmp_path / "last.ckpt")  # architecture from the checkpoint
    assert isinstance(loaded, base.ImageClassifier)
    assert loaded.hparams.arch == "mlp" and loaded.hparams.num_classes == 3
    assert loaded.hparams.arch_args == arch_args and loaded.hparams.lr == 0.05
    assert loaded.weights_report.ema and loaded.weights_report.format == "lightning"
    torch.testing.assert_close(logits(loaded.net, 8), logits(ema_net, 8), atol=0, rtol=0)

    raw = zoo.load("mlp", weights=tmp_path / "last.ckpt", use_ema=False)
    torch.testing.assert_close(logits(raw.net, 8), logits(model.net, 8), atol=0, rtol=0)
    assert raw.hparams.arch_args == arch_args


def test_load_fine_tune_head_and_safetensors_rebuild(base, tmp_path):
    import zoo

    model = base.ImageClassifier(arch="convnet", num_classes=10, arch_args={"widths": [8, 16]})
    randomize(model.net)
    export_safetensors(model, tmp_path / "convnet.safetensors")
    again = zoo.load(weights=tmp_path / "convnet.safetensors")
    assert again.hparams.num_classes == 10 and again.hparams.arch_args == {"widths": [8, 16]}
    torch.testing.assert_close(logits(again.net), logits(model.net), atol=0, rtol=0)

    tuned = zoo.load("convnet", weights=tmp_path / "convnet.safetensors", num_classes=4)
    assert tuned.weights_report.head_reset == (10, 4)
    assert heads.get_classifier(tuned.net).out_features == 4


def test_load_infers_num_classes_from_a_plain_state_dict(tmp_path):
    import zoo

    torch.save(fast_random(tvm.resnet18, num_classes=37).state_dict(), tmp_path / "r18-pets.pth")
    model = zoo.load("resnet18", weights=tmp_path / "r18-pets.pth")
    assert model.hparams.num_classes == 37 and model.weights_report.head_reset is None


def test_load_errors():
    import zoo

    with pytest.raises(registry.UnknownModelError, match="resnet50"):
        zoo.load("resnet5O")
    with pytest.raises(WeightsError, match="cannot tell which architecture"):
        zoo.load(weights={"fc.weight": torch.zeros(2, 2)})


def test_image_classifier_weights_argument(base, tmp_path):
    src = randomize(registry.create_network("convnet", num_classes=5))
    torch.save(src.state_dict(), tmp_path / "c.pth")
    model = base.ImageClassifier(arch="convnet", num_classes=5, weights=str(tmp_path / "c.pth"))
    torch.testing.assert_close(logits(model.net), logits(src), atol=0, rtol=0)


def test_hubconf_has_every_model(base):
    import hubconf

    assert hubconf.dependencies == ["torch", "timm", "torchvision"]
    for name in registry.list_models():
        assert callable(getattr(hubconf, name))
    model = hubconf.logreg(arch_args={"input_size": 4}, num_classes=2)
    assert isinstance(model, base.ImageClassifier) and model.net.fc.in_features == 48


@pytest.mark.slow
def test_real_lightning_checkpoint_with_weight_ema(base, tmp_path):
    """A checkpoint written by Trainer (WeightEMA callback on) loads with weights_only=True."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import zoo
    from callbacks.ema import WeightEMA

    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 4, (16,)))
    model = base.ImageClassifier(arch="convnet", num_classes=4, arch_args={"widths": [8, 16]}, lr=0.01)
    ema = WeightEMA(decay=0.5)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema], default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = zoo.load(weights=tmp_path / "last.ckpt")
    assert loaded.weights_report.ema
    for k, v in ema.ema.items():
        torch.testing.assert_close(loaded.net.state_dict()[k], v, atol=0, rtol=0)
    raw = zoo.load(weights=tmp_path / "last.ckpt", use_ema=False)
    for k, v in model.net.state_dict().items():
        torch.testing.assert_close(raw.net.state_dict()[k], v, atol=0, rtol=0)


def test_torch_hub_load_from_a_local_checkout(base, tmp_path):
    """torch.hub.load(<repo dir>, name, source="local") goes through hubconf.py and zoo.load."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = registry.create_network("convnet", num_classes=3)
    torch.save(src.state_dict(), tmp_path / "c.pth")
    model = torch.hub.load(str(repo), "convnet", source="local", weights=str(tmp_path / "c.pth"), num_classes=3)
    assert isinstance(model, base.ImageClassifier)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[k], v)


def test_create_records_its_weights_as_the_constructor_does(base, tmp_path):
    """``zoo.create(weights=...)`` loads from its one read and keeps the source as the ``weights``
    hyper-parameter (a fit's checkpoint says where its initial weights came from), as
    ``ImageClassifier(weights=...)`` does; ``zoo.load`` records none."""
    import zoo

    src = registry.create_network("convnet", num_classes=3)
    path = tmp_path / "c.pth"
    torch.save(src.state_dict(), path)
    made = zoo.create("convnet", weights=str(path))
    built = base.ImageClassifier(arch="convnet", num_classes=3, weights=str(path))
    for model in (made, built):
        assert model.hparams.weights == model.hparams_initial["weights"] == str(path)
        torch.testing.assert_close(model.net.state_dict(), src.state_dict())
    assert zoo.load("convnet", weights=str(path)).hparams.weights is None


def test_weights_package_imports_nothing_of_the_model():
    """``zoo.weights`` is state-dict I/O on bare networks: no import of the model (``zoo.base``),
    of the layer that builds models from weights (``zoo.factory``) or of Lightning."""
    import ast

    import zoo

    pkg = pathlib.Path(zoo.__file__).parent / "weights"
    found = []
    for f in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):  # from ..base import X: "zoo.base"; from .. import base: "zoo.base"
                parent = ["zoo", "weights"][: max(0, 3 - node.level)] if node.level else []
                mod = ".".join(parent + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [f"{f.name}: {n}" for n in names if n.split(".")[:2] in (["zoo", "base"], ["zoo", "factory"])
                      or n.split(".")[0] == "lightning"]
    assert not found, found
