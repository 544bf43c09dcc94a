"""Architectures: every registry entry runs, published sizes and costs, family options, heads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zoo import heads, registry
from zoo.mlp import DropConnectLinear

# Entries whose real build (init of ~50-200M parameters) plus a forward takes seconds here.
BIG = {"convnext_small", "convnext_base", "convnext_large", "resnext101_32x8d", "resnet152", "wide_resnet50_2"}
# flatten -> Linear families are built for one input size
SMALL_INPUT_ARGS = {"logreg": {"input_size": 16}, "mlp": {"input_size": 16, "width": 32}}
TIMM_SAMPLES = ["timm/resnet18", "timm/convnext_atto"]


def _small_case(name: str) -> tuple[dict, int]:
    args = SMALL_INPUT_ARGS.get(name, {})
    return args, args.get("input_size", 32)


def _registry_params():
    for name in registry.list_models() + TIMM_SAMPLES:
        marks = [pytest.mark.slow] if name in BIG else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_registry_params()))
def test_every_entry_forward(name):
    """Forward on CPU at a small resolution: output shape, finite values, a data config."""
    torch.manual_seed(0)
    args, size = _small_case(name)
    net = registry.create_network(name, num_classes=7, **args).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, size, size))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    dc = registry.get_data_config(name)
    assert 0 < dc.crop_pct <= 1 and dc.input_size > 0 and len(dc.mean) == len(dc.std) == 3
    assert isinstance(heads.get_classifier(net), nn.Linear)


# torchvision's tables (Weights.meta["num_params"]), 1000 classes. Only for what the zoo builds
# with other code than torchvision's: ConvNeXt is timm's module (zoo/convnext.py), and torchvision's
# weights convert into it only if every shape agrees. The ResNet family is torchvision's own
# builder (zoo/resnet.py), whose sizes torchvision's tables restate; that its published weights
# load is tested in tests/test_weights.py.
PUBLISHED_PARAMS = {
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
}


def _meta_net(name: str, **kw) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return registry.create_network(name, **kw)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_matches_torchvision(name):
    n = sum(p.numel() for p in _meta_net(name).parameters())
    assert n == PUBLISHED_PARAMS[name]
    assert n == tvm.get_model_weights(name).DEFAULT.meta["num_params"]


def _macs(net: nn.Module, size: int = 224) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2  # one multiply-accumulate = 2 FLOPs


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_macs_match_torchvision(name):
    """Multiply-accumulates at 224x224 within 2% of torchvision's GFLOPS column (its ``_ops``).

    FlopCounterMode counts convolutions and matmuls (not norms/activations), as the tables do.
    """
    published = tvm.get_model_weights(name).DEFAULT.meta["_ops"] * 1e9
    assert _macs(_meta_net(name)) == pytest.approx(published, rel=0.02)


def test_macs_headline_numbers():
    assert _macs(_meta_net("resnet50")) / 1e9 == pytest.approx(4.09, rel=0.02)
    assert _macs(_meta_net("convnext_tiny")) / 1e9 == pytest.approx(4.46, rel=0.02)


def test_convnet_default_is_cpu_sized():
    net = registry.create_network("convnet", num_classes=10)
    n = sum(p.numel() for p in net.parameters())
    assert 300_000 <= n <= 1_000_000
    assert _macs(_meta_net("convnet", num_classes=10), size=64) < 30e6  # 15.3 M measured
    assert registry.get_data_config("convnet").input_size == 64


# ----------------------------------------------------------------------------- data configs


def test_data_configs_follow_the_weights():
    r = registry.get_data_config("resnet50")
    assert (r.input_size, r.crop_pct, r.interpolation) == (224, 0.875, "bilinear")
    # torchvision ConvNeXt_*_Weights: resize 236/230/232/232, crop 224, bilinear
    for name, resize in [("convnext_tiny", 236), ("convnext_small", 230), ("convnext_base", 232), ("convnext_large", 232)]:
        dc = registry.get_data_config(name)
        t = tvm.get_model_weights(name).DEFAULT.transforms()
        assert t.resize_size == [resize] and t.crop_size == [224]
        assert dc.crop_pct == pytest.approx(224 / resize) and dc.interpolation == "bilinear"


def test_timm_entry_uses_timm_pretrained_cfg():
    import timm

    dc = registry.get_data_config("timm/convnext_tiny")
    cfg = timm.models.get_pretrained_cfg("convnext_tiny")
    assert dc.crop_pct == cfg.crop_pct and dc.interpolation == cfg.interpolation
    assert dc.input_size == cfg.input_size[-1] and dc.mean == tuple(cfg.mean)
    vit = registry.get_data_config("timm/vit_tiny_patch16_224")
    assert vit.mean == (0.5, 0.5, 0.5)
    assert registry.get_entry("timm/resnet18").family == "timm"


def test_unknown_timm_name_suggests():
    with pytest.raises(registry.UnknownModelError, match="timm/resnet18"):
        registry.get_entry("timm/resnet18x")


# ----------------------------------------------------------------------------- logreg / mlp


def test_logreg_is_one_linear_layer_and_checks_its_input():
    net = registry.create_network("logreg", num_classes=10, input_size=8)
    assert [type(m) for m in net.children()] == [nn.Linear]
    assert net.fc.in_features == 3 * 8 * 8
    with pytest.raises(ValueError, match=r"built for inputs of shape \(3, 8, 8\).*input_size"):
        net(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("activation,gain2", [("relu", 2.0), ("gelu", 2.0), ("sigmoid", 1.0)])
def test_mlp_fan_in_init(activation, gain2):
    torch.manual_seed(0)
    net = registry.create_network("mlp", num_classes=10, depth=2, width=256, activation=activation, input_size=16)
    w = net.blocks[0].fc.weight  # fan_in = 3*16*16 = 768
    assert w.std().item() == pytest.approx(math.sqrt(gain2 / 768), rel=0.05)
    assert net.blocks[0].fc.bias.abs().max() == 0
    assert net.fc.weight.std().item() == pytest.approx(math.sqrt(1 / 256), rel=0.1)  # logits: gain 1


# (arch, arch_args, the first weighted layer, its activation's fan-in gain^2, its fan_in, fan_out)
INIT_CASES = [
    ("mlp", {"input_size": 16, "width": 256, "activation": "relu"}, lambda n: n.blocks[0].fc, 2.0, 768, 256),
    ("mlp", {"input_size": 16, "width": 256, "activation": "sigmoid"}, lambda n: n.blocks[0].fc, 1.0, 768, 256),
    ("convnet", {"widths": [32, 64]}, lambda n: n.stages[1][0].conv, 2.0, 32 * 9, 64 * 9),
    ("logreg", {"input_size": 16}, lambda n: n.fc, 1.0, 768, 10),
    ("resnet18", {}, lambda n: n.layer2[0].conv2, 2.0, 128 * 9, 128 * 9),  # any family: one helper
]


@pytest.mark.parametrize("arch,args,layer,gain2,fan_in,fan_out", INIT_CASES, ids=[f"{c[0]}-{c[1].get('activation', '')}" for c in INIT_CASES])
@pytest.mark.parametrize("scheme", ["fan_in", "xavier", "normal", "small"])
def test_arch_args_init_schemes(scheme, arch, args, layer, gain2, fan_in, fan_out):
    from zoo.base import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(arch=arch, num_classes=10, arch_args={**args, "init": scheme})
    w = layer(model.net).weight
    expected = {"fan_in": math.sqrt(gain2 / fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)),
                "normal": 1.0, "small": 0.01}[scheme]
    assert w.std().item() == pytest.approx(expected, rel=0.1)
    assert abs(w.mean().item()) < 0.1 * expected
    b = layer(model.net).bias
    assert b is None or b.abs().max() == 0
    assert model.hparams.arch_args["init"] == scheme  # a checkpoint rebuilds with it


def test_unknown_init_is_one_line_listing_the_choices():
    from zoo.base import ImageClassifier

    for build in (lambda: ImageClassifier(arch="mlp", num_classes=3, arch_args={"input_size": 8, "init": "he"}),
                  lambda: registry.create_network("convnet", num_classes=3, init="kaiming"),
                  lambda: ImageClassifier(arch="resnet18", num_classes=3, arch_args={"init": "he"})):
        with pytest.raises(ValueError, match=r"unknown init '\w+'; choose one of fan_in, xavier, normal, small") as e:
            build()
        assert "\n" not in str(e.value)


def test_mlp_relu_init_keeps_activation_scale_with_depth():
    """He init: the second moment of ReLU activations stays O(1) through 8 layers."""
    torch.manual_seed(0)
    net = registry.create_network("mlp", num_classes=10, depth=8, width=512, activation="relu", input_size=16)
    a = torch.randn(256, 3 * 16 * 16)
    moments = []
    with torch.no_grad():
        for block in net.blocks:
            a = block(a)
            moments.append(a.pow(2).mean().item())
    assert 0.3 < moments[-1] / moments[0] < 3


def test_mlp_dropconnect_matches_eval_in_expectation():
    torch.manual_seed(0)
    layer = DropConnectLinear(64, 32, p=0.5)
    x = torch.randn(8, 64)
    with torch.no_grad():
        layer.eval()
        ref = layer(x)
        assert torch.equal(layer(x), ref)  # eval: the plain layer, deterministic
        layer.train()
        samples = torch.stack([layer(x) for _ in range(400)])
    assert not torch.equal(samples[0], samples[1])  # training drops weights
    # inverted scaling: E_train[y] = y_eval; each of the 256 outputs within 6 standard errors (max seen over 200 seeds: ~5)
    mean = samples.mean(0)
    sem = samples.std(0) / math.sqrt(len(samples))
    assert ((mean - ref).abs() <= 6 * sem).all()
    # projection of the mean train output on the eval output: 1 (it would be 0.5 = 1 - p
    # without the 1/(1-p) scaling)
    assert (mean * ref).sum() / (ref * ref).sum() == pytest.approx(1.0, abs=0.05)


def test_mlp_dropconnect_only_drops_in_training():
    net = registry.create_network("mlp", num_classes=4, depth=2, width=16, dropconnect=0.3, input_size=4)
    x = torch.randn(3, 3, 4, 4)
    net.eval()
    assert torch.equal(net(x), net(x))
    assert net.blocks[0].fc.p == 0.3
    with pytest.raises(ValueError, match="dropconnect"):
        DropConnectLinear(4, 4, p=1.0)


def test_mlp_skip_connections():
    torch.manual_seed(0)
    net = registry.create_network("mlp", num_classes=4, depth=3, width=16, skip=True, input_size=4)
    assert not net.blocks[0].skip  # 48 -> 16: shapes differ, no skip
    assert net.blocks[1].skip and net.blocks[2].skip
    # a zeroed layer with ReLU gives act(0) = 0, so a = 0 + a_prev: the block is the identity
    blk = net.blocks[1]
    nn.init.zeros_(blk.fc.weight)
    nn.init.zeros_(blk.fc.bias)
    a = torch.randn(5, 16)
    assert torch.equal(blk(a), a)
    plain = registry.create_network("mlp", num_classes=4, depth=3, width=16, skip=False, input_size=4)
    assert not any(b.skip for b in plain.blocks)


@pytest.mark.parametrize("norm,cls", [("batchnorm", nn.BatchNorm1d), ("layernorm", nn.LayerNorm), ("none", nn.Identity)])
def test_mlp_norms(norm, cls):
    torch.manual_seed(0)
    net = registry.create_network("mlp", num_classes=4, depth=2, width=32, norm=norm, input_size=4, activation="gelu")
    assert all(isinstance(b.norm, cls) for b in net.blocks)
    x = torch.randn(64, 3, 4, 4) * 10 + 3
    z = net.blocks[0].norm(net.blocks[0].fc(torch.flatten(x, 1)))  # train mode
    if norm == "batchnorm":  # per unit over the batch
        assert z.mean(0).abs().max() < 1e-4 and (z.var(0, unbiased=False) - 1).abs().max() < 1e-2
    elif norm == "layernorm":  # per example over the units
        assert z.mean(1).abs().max() < 1e-4
    assert net(x).shape == (64, 4)


def test_mlp_rejects_bad_options():
    with pytest.raises(ValueError, match="activation"):
        registry.create_network("mlp", activation="softsign", input_size=4)
    with pytest.raises(ValueError, match="norm"):
        registry.create_network("mlp", norm="groupnorm", input_size=4)


# ----------------------------------------------------------------------------- convnet / resnet


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_convnet_options(downsample):
    torch.manual_seed(0)
    net = registry.create_network(
        "convnet", num_classes=5, widths=(8, 16), depths=(2, 2), downsample=downsample, skip=True
    )
    blocks = [m for m in net.modules() if m.__class__.__name__ == "ConvBNAct"]
    assert [b.skip for b in blocks] == [False, True, False, True]  # skip where shapes match
    assert any(isinstance(m, nn.MaxPool2d) for m in net.modules()) == (downsample == "maxpool")
    conv = blocks[0].conv
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (3 * 9)), rel=0.3)  # He
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def _last_bn_gammas(net: nn.Module) -> list[torch.Tensor]:
    """Each residual block's last BN weight (BasicBlock bn2, Bottleneck bn3)."""
    blocks = [m for m in net.modules() if isinstance(m, (tvm.resnet.BasicBlock, tvm.resnet.Bottleneck))]
    return [(b.bn3 if isinstance(b, tvm.resnet.Bottleneck) else b.bn2).weight for b in blocks]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", pytest.param("resnext50_32x4d", marks=pytest.mark.slow)])
def test_resnet_family_zero_inits_last_bn_by_default_as_timm(name):
    """Goyal et al. 2017 / He et al. 2019: the default build starts every block as the identity;
    zero_init_residual=False is torchvision's init."""
    default = _last_bn_gammas(registry.create_network(name))
    assert default and all(g.abs().sum() == 0 for g in default)
    tv = _last_bn_gammas(registry.create_network(name, zero_init_residual=False))
    assert tv and all(torch.equal(g, torch.ones_like(g)) for g in tv)


_RECIPES = Path(__file__).resolve().parent.parent / "launch" / "recipes"
_TV_RESNETS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
               "resnext50_32x4d", "resnext101_32x8d"}


def test_every_resnet_recipe_states_its_residual_init():
    """A recipe reproducing a published run keeps its source's choice explicitly."""
    import yaml

    seen = {}
    for path in sorted(_RECIPES.glob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model", {})
        if model.get("arch") in _TV_RESNETS:
            seen[path.stem] = (model.get("arch_args") or {}).get("zero_init_residual")
    assert seen and None not in seen.values(), seen
    # ffcv-imagenet and torchvision's references build torchvision's model: zero_init_residual False
    assert not any(v for k, v in seen.items() if k.startswith(("resnet18", "resnet50")))


def test_recipe_pinning_torchvisions_init_builds_nonzero_last_bn():
    import yaml

    model = yaml.safe_load((_RECIPES / "resnet18.yaml").read_text())["model"]
    net = registry.create_network(model["arch"], **model["arch_args"])
    gammas = _last_bn_gammas(net)
    assert gammas and all(torch.equal(g, torch.ones_like(g)) for g in gammas)


def test_convnext_args():
    net = registry.create_network("convnext_tiny", num_classes=3, drop_path_rate=0.1, layer_scale_init=1e-6)
    gammas = [b.gamma for b in net.modules() if hasattr(b, "gamma") and isinstance(b.gamma, nn.Parameter)]
    assert len(gammas) == 18 and all(torch.allclose(g, torch.full_like(g, 1e-6)) for g in gammas)
    rates = [b.drop_path.drop_prob for b in net.modules() if hasattr(b, "drop_path") and hasattr(b.drop_path, "drop_prob")]
    assert max(rates) == pytest.approx(0.1)  # linear 0 -> 0.1 over the blocks


# ----------------------------------------------------------------------------- heads

HEAD_CASES = [
    ("logreg", {"input_size": 8}, "fc"),
    ("mlp", {"input_size": 8, "width": 16}, "fc"),
    ("convnet", {}, "fc"),
    ("resnet18", {}, "fc"),
    ("convnext_tiny", {}, "head.fc"),
    ("timm/resnet18", {}, "fc"),
    ("timm/convnext_atto", {}, "head.fc"),
    ("timm/vit_tiny_patch16_224", {}, "head"),
]


@pytest.mark.parametrize("name,args,prefix", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_heads(name, args, prefix):
    net = registry.create_network(name, num_classes=10, **args)
    head = heads.get_classifier(net)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert heads.classifier_prefix(net) == prefix
    assert f"{prefix}.weight" in net.state_dict()
    new = heads.reset_classifier(net, 3)
    assert heads.get_classifier(net) is new and new.out_features == 3 and new.in_features == head.in_features
    assert heads.classifier_prefix(net) == prefix


def test_heads_of_plain_torchvision_models():
    cnx = tvm.convnext_tiny(num_classes=5)
    assert heads.classifier_prefix(cnx) == "classifier.2"
    heads.reset_classifier(cnx, 2)
    assert cnx.classifier[2].out_features == 2
    eff = tvm.mobilenet_v3_small(num_classes=5)
    assert heads.classifier_prefix(eff) == "classifier.3"


class _CompiledLike(nn.Module):
    """Stands in for torch.compile's OptimizedModule (which keeps the net as ``_orig_mod``)
    without importing dynamo (seconds)."""

    def __init__(self, net):
        super().__init__()
        self._orig_mod = net


def test_heads_through_compile_wrapper():
    net = registry.create_network("convnet", num_classes=4)
    compiled = _CompiledLike(net)
    assert heads.get_classifier(compiled) is net.fc
    assert heads.classifier_prefix(compiled) == "_orig_mod.fc"
    assert "_orig_mod.fc.weight" in compiled.state_dict()


def test_blurpool_keeps_keys_and_params_and_blurs_strided_convs():
    from zoo.resnet import BlurConv2d

    torch.manual_seed(0)
    plain = registry.create_network("resnet18", num_classes=10)
    blur = registry.create_network("resnet18", num_classes=10, blurpool=True)
    assert list(plain.state_dict()) == list(blur.state_dict())
    blur.load_state_dict(plain.state_dict())  # torchvision weights load into the blurpool net
    swapped = [m for m in blur.modules() if isinstance(m, BlurConv2d)]
    # ffcv-imagenet's rule (stride > 1, >= 16 input channels): layer2-4's first 3x3 conv and
    # downsample 1x1 conv; the stem (3 input channels) is left alone.
    assert len(swapped) == 6 and all(max(m.stride) > 1 and m.in_channels >= 16 for m in swapped)
    x = torch.randn(2, 3, 64, 64)
    plain.eval(), blur.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), blur(x))
        # a constant image is unchanged by the low-pass filter away from the zero padding
        conv = swapped[0]
        c = torch.ones(1, conv.in_channels, 8, 8)
        torch.testing.assert_close(
            conv(c)[..., 1:-1, 1:-1],
            torch.nn.functional.conv2d(c, conv.weight, conv.bias, conv.stride, conv.padding)[..., 1:-1, 1:-1],
        )


# ----------------------------------------------------------------------------- layering


def _zoo_imports(path) -> set[str]:
    """Modules of the zoo a file imports (relative imports and ``zoo.*``), at any depth."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level > 0 and node.module is None:  # from . import families
                found.update("." * node.level + a.name for a in node.names)
            elif node.level > 0:
                found.add("." * node.level + node.module)
            elif node.module and node.module.split(".")[0] == "zoo":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "zoo")
    return found


def test_layers_point_one_way():
    """registry <- families <- zoo/__init__ (as timm): the registry imports nothing of the zoo,
    and no family imports the LightningModule or the weights package."""
    from pathlib import Path

    import zoo

    root = Path(zoo.__file__).parent
    assert _zoo_imports(root / "registry.py") == set()
    for family in ("linear", "mlp", "convnet", "resnet", "convnext", "timm_model"):
        imported = _zoo_imports(root / f"{family}.py")
        above = {m for m in imported if m in (".", ".base", ".families", "zoo") or m.startswith((".weights", "zoo.base", "zoo.weights"))}
        assert ".registry" in imported and not above, (family, imported)
    assert ".families" in _zoo_imports(root / "__init__.py")
