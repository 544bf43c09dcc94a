"""One model, whatever path loads it: every loading path x every source kind gives the same
network (logits on a fixed input) and the same data config, EMA weights by default.

Paths: ``zoo.load``, ``zoo.create(weights=)``, ``ImageClassifier.load_from_checkpoint``,
``zoo validate --model.weights``, ``zoo validate --ckpt_path``, ``torch.hub.load`` (local
checkout). Sources: this project's .ckpt (WeightEMA on: EMA by default, trained weights with
``use_ema=False``), safetensors with metadata, a Hugging Face folder, torchvision / timm /
official-ConvNeXt state dicts. The expected values are the source's own: the logits of the
network that was saved and the preprocessing it was saved with (or the architecture's
default where nothing travels with the weights).

``python tests/test_loading_paths.py`` prints the table (for the closing note).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import pytest
import torch
from torch import nn

from tests.helpers import REPO
from tests.test_weights import randomize  # random values in every float tensor, BN statistics too
from zoo import registry
from zoo.registry import DataConfig

NUM_CLASSES = 3  # tiny_imagenet's classes: the CLI paths evaluate on it
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(123))
# preprocessing unlike any architecture's default: a path that drops it cannot pass
CUSTOM_DC = DataConfig(input_size=48, crop_pct=0.95, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
CONVNET_ARGS = {"widths": [8, 16]}


def logits_of(net: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(X)


@dataclasses.dataclass
class Source:
    kind: str
    path: Path
    arch: str
    arch_args: dict
    logits: torch.Tensor  # of the network the weights came from (EMA or trained)
    data_config: dict  # what every path must end up with
    use_ema: bool = True
    lightning: bool = False  # a Lightning checkpoint (load_from_checkpoint / --ckpt_path apply)


def _timm_to_official(sd: dict) -> dict:
    """timm ConvNeXt keys -> facebookresearch/ConvNeXt's (the inverse of timm's checkpoint_filter_fn)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = re.sub(r"^head\.norm\.", "norm.", k)
        out[re.sub(r"^head\.fc\.", "head.", k)] = v
    return out


def build_sources(tmp: Path) -> list[Source]:
    import timm
    import torchvision.models as tvm
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.ema import WeightEMA
    from zoo.base import ImageClassifier
    from zoo.weights import export_safetensors

    out: list[Source] = []
    default = lambda arch: registry.get_data_config(arch).as_dict()  # noqa: E731

    # safetensors with metadata, and a Hugging Face folder: weights + CUSTOM_DC travel together
    for kind, seed, dest in (("safetensors", 1, tmp / "c.safetensors"), ("hf-folder", 2, tmp / "hf")):
        m = ImageClassifier(arch="convnet", num_classes=NUM_CLASSES, arch_args=CONVNET_ARGS)
        randomize(m.net, seed)
        path = export_safetensors(m, dest, data_config=CUSTOM_DC)
        out.append(Source(kind, path, "convnet", CONVNET_ARGS, logits_of(m.net), CUSTOM_DC.as_dict()))

    # this project's .ckpt from a real Trainer, WeightEMA on; its model started from the
    # safetensors above, so the checkpoint carries CUSTOM_DC
    torch.manual_seed(0)
    model = ImageClassifier(arch="convnet", num_classes=NUM_CLASSES, arch_args=CONVNET_ARGS,
                            weights=str(out[0].path), lr=0.05, lr_reference_batch=None)
    data = TensorDataset(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.randint(0, NUM_CLASSES, (8,)))
    ema = WeightEMA(decay=0.5)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema], default_root_dir=tmp)
    trainer.fit(model, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp / "last.ckpt")
    trained = logits_of(model.net)
    ema_net = registry.create_network("convnet", num_classes=NUM_CLASSES, **CONVNET_ARGS)
    ema_net.load_state_dict({**model.net.state_dict(), **ema.ema})
    ema_logits = logits_of(ema_net)
    assert not torch.allclose(trained, ema_logits)  # the two rows below test different tensors
    out.append(Source("ckpt (EMA)", tmp / "last.ckpt", "convnet", CONVNET_ARGS, ema_logits, CUSTOM_DC.as_dict(), lightning=True))
    out.append(Source("ckpt use_ema=False", tmp / "last.ckpt", "convnet", CONVNET_ARGS, trained, CUSTOM_DC.as_dict(),
                      use_ema=False, lightning=True))

    # foreign state dicts: nothing travels with them, the architecture's default applies
    tv = randomize(tvm.resnet18(num_classes=NUM_CLASSES), 3)
    torch.save(tv.state_dict(), tmp / "resnet18-tv.pth")
    out.append(Source("torchvision state_dict", tmp / "resnet18-tv.pth", "resnet18", {}, logits_of(tv), default("resnet18")))
    with torch.device("meta"):
        tm = timm.create_model("convnext_tiny", pretrained=False, num_classes=NUM_CLASSES)
    tm = randomize(tm.to_empty(device="cpu"), 4)
    torch.save(tm.state_dict(), tmp / "convnext-timm.pth")
    out.append(Source("timm state_dict", tmp / "convnext-timm.pth", "convnext_tiny", {}, logits_of(tm), default("convnext_tiny")))
    torch.save({"model": _timm_to_official(tm.state_dict()), "epoch": 299}, tmp / "convnext_tiny_1k_224_ema.pth")
    out.append(Source("official ConvNeXt", tmp / "convnext_tiny_1k_224_ema.pth", "convnext_tiny", {}, logits_of(tm),
                      default("convnext_tiny")))
    return out


# ----------------------------------------------------------------------------- paths
# Each returns (network logits on X, the model's data config, the DataModule's (crop, interpolation) or None).


def _model_result(model) -> tuple:
    return logits_of(model.net), dict(model.data_config), None


def via_zoo_load(s: Source, tmp: Path):
    import zoo

    return _model_result(zoo.load(s.arch, weights=s.path, num_classes=NUM_CLASSES, use_ema=s.use_ema))


def via_zoo_create(s: Source, tmp: Path):
    import zoo

    return _model_result(zoo.create(s.arch, weights=str(s.path), num_classes=NUM_CLASSES,
                                    arch_args=s.arch_args or None, use_ema=s.use_ema))


def via_zoo_create_classes_from_weights(s: Source, tmp: Path):
    import zoo
    from zoo.weights import sources

    reads = []  # files read (a snapshot folder here holds one weights file)
    real = sources._read_file
    sources._read_file = lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    try:
        model = zoo.create(s.arch, weights=str(s.path), arch_args=s.arch_args or None, use_ema=s.use_ema)
    finally:
        sources._read_file = real
    assert model.hparams.num_classes == NUM_CLASSES, "zoo.create without num_classes: as many as the weights have"
    assert len(reads) == 1, f"the weights were read {len(reads)} times"  # the class count and the load share one read
    return _model_result(model)


def via_load_from_checkpoint(s: Source, tmp: Path):
    from zoo.base import ImageClassifier

    return _model_result(ImageClassifier.load_from_checkpoint(s.path, map_location="cpu", use_ema=s.use_ema))


def via_torch_hub(s: Source, tmp: Path):
    model = torch.hub.load(str(REPO), s.arch, source="local", weights=str(s.path), num_classes=NUM_CLASSES,
                           use_ema=s.use_ema)
    return _model_result(model)


class Capture(L.Callback):
    """What `zoo validate` evaluates: the network's logits on X and the preprocessing in use."""

    seen: Optional[tuple] = None

    def on_validation_start(self, trainer, pl_module) -> None:
        training = pl_module.net.training
        dm = trainer.datamodule
        Capture.seen = (logits_of(pl_module.net), dict(pl_module.data_config), (dm.val_crop, dm.interpolation))
        pl_module.net.train(training)


def _zoo_validate(args: list[str], tmp: Path, data: Path):
    from launch.cli import main

    Capture.seen = None
    rc = main(["validate", "--config", str(REPO / "launch/recipes/demo.yaml"), "--data.root", str(data),
               "--data.backend", "torchvision", "--data.num_workers", "0", "--data.batch_size", "3",
               "--data.train_res", "32", "--data.val_res", "32", "--data.val_crop_ratio", "null",
               "--trainer.limit_val_batches", "1", "--trainer.callbacks",
               '[{"class_path": "tests.test_loading_paths.Capture"}]',
               "--run.root", str(tmp / "runs"), "--run.logger", "none", *args])
    assert rc == 0 and Capture.seen is not None
    return Capture.seen


def via_cli_weights(s: Source, tmp: Path, data: Path):
    args = ["--model.arch", s.arch, "--model.weights", str(s.path), "--model.use_ema", str(s.use_ema).lower()]
    if s.arch_args:
        args += ["--model.arch_args", str(s.arch_args).replace("'", '"')]
    return _zoo_validate(args, tmp, data)


def via_cli_ckpt_path(s: Source, tmp: Path, data: Path):
    return _zoo_validate(["--ckpt_path", str(s.path), "--model.use_ema", str(s.use_ema).lower()], tmp, data)


@pytest.mark.slow
def test_ckpt_path_wins_over_model_weights_and_says_so(sources, tmp_path, tiny_imagenet, capsys):
    """Both given: Lightning restores the checkpoint over the initial weights; one line says so."""
    ckpt, other = sources["ckpt (EMA)"], sources["safetensors"]
    assert other.arch == ckpt.arch and not torch.allclose(other.logits, ckpt.logits)
    result = _zoo_validate(["--ckpt_path", str(ckpt.path), "--model.weights", str(other.path)], tmp_path, tiny_imagenet)
    check("zoo validate --ckpt_path --model.weights", ckpt, result)
    out = capsys.readouterr().out
    assert f"zoo: the weights come from --ckpt_path {ckpt.path}; model.weights {other.path} (initial weights) is overridden" in out


NOT_LIGHTNING = "needs a Lightning checkpoint (hyper_parameters + state_dict); a bare state dict has neither"
PATHS: list[tuple[str, Callable, Optional[str], bool]] = [  # name, fn, skip reason for non-Lightning sources, CLI
    ("zoo.load", via_zoo_load, None, False),
    ("zoo.create(weights=)", via_zoo_create, None, False),
    ("zoo.create(weights=), no num_classes", via_zoo_create_classes_from_weights, None, False),
    ("load_from_checkpoint", via_load_from_checkpoint, NOT_LIGHTNING, False),
    ("torch.hub.load (local)", via_torch_hub, None, False),
    ("zoo validate --model.weights", via_cli_weights, None, True),
    ("zoo validate --ckpt_path", via_cli_ckpt_path, NOT_LIGHTNING, True),
]
SOURCE_KINDS = ["safetensors", "hf-folder", "ckpt (EMA)", "ckpt use_ema=False", "torchvision state_dict",
                "timm state_dict", "official ConvNeXt"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Source]:
    srcs = {s.kind: s for s in build_sources(tmp_path_factory.mktemp("sources"))}
    assert list(srcs) == SOURCE_KINDS
    return srcs


def check(path_name: str, s: Source, result: tuple) -> None:
    got_logits, got_dc, dm = result
    torch.testing.assert_close(got_logits, s.logits, atol=1e-5, rtol=0,
                               msg=lambda m: f"{path_name} x {s.kind}: other network weights\n{m}")
    assert got_dc == s.data_config, f"{path_name} x {s.kind}: data config {got_dc} != {s.data_config}"
    if dm is not None:  # the DataModule evaluates with the same crop and interpolation
        assert dm == (pytest.approx(s.data_config["crop_pct"]), s.data_config["interpolation"]), (path_name, s.kind, dm)


def _cases():
    for name, fn, skip, cli in PATHS:
        for kind in SOURCE_KINDS:
            marks = [pytest.mark.slow] if cli else []
            lightning = kind.startswith("ckpt")
            if skip and not lightning:
                marks.append(pytest.mark.skip(reason=f"{name} x {kind}: {skip}"))
            yield pytest.param(name, kind, marks=marks, id=f"{name}-{kind}")


@pytest.mark.parametrize("path_name,kind", list(_cases()))
def test_every_path_gives_the_same_model(path_name, kind, sources, tmp_path, tiny_imagenet):
    fn, cli = next((f, c) for n, f, _, c in PATHS if n == path_name)
    s = sources[kind]
    result = fn(s, tmp_path, tiny_imagenet) if cli else fn(s, tmp_path)
    check(path_name, s, result)


def print_table() -> None:
    """The paths x sources table of the closing note (python -m tests.test_loading_paths)."""
    import tempfile

    from tests.conftest import make_image_folder

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = make_image_folder(tmp / "data")
        srcs = build_sources(tmp / "src")
        print("| path | " + " | ".join(s.kind for s in srcs) + " |")
        print("|---" * (len(srcs) + 1) + "|")
        for name, fn, skip, cli in PATHS:
            cells = []
            for s in srcs:
                if skip and not s.lightning:
                    cells.append("n/a")
                    continue
                try:
                    check(name, s, fn(s, tmp, data) if cli else fn(s, tmp))
                    cells.append("same")
                except Exception as e:  # noqa: BLE001 - the table shows what went wrong
                    cells.append(f"DIFFERS ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


# ----------------------------------------------------------------------------- EMA vs resume


def test_checkpoint_says_which_weights_it_holds(sources):
    ckpt = torch.load(sources["ckpt (EMA)"].path, map_location="cpu", weights_only=True)
    said = ckpt["zoo_weights"]
    assert said["state_dict"].startswith("trained weights")
    assert "WeightEMA" in said["ema"] and said["evaluated_with"].startswith("ema")
    assert "use_ema" not in ckpt["hyper_parameters"]  # a loader's choice: the command line decides


def test_load_report_names_ema_weights(sources):
    import zoo

    model = zoo.load(weights=sources["ckpt (EMA)"].path)
    assert model.weights_report.ema and "EMA weights" in str(model.weights_report)
    assert not zoo.load(weights=sources["ckpt (EMA)"].path, use_ema=False).weights_report.ema


def test_fit_resume_keeps_the_trained_weights(sources, tmp_path):
    """`zoo fit --ckpt_path` (Trainer.fit(ckpt_path=...)) restores the trained weights, not the EMA."""
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.ema import WeightEMA
    from zoo.base import ImageClassifier

    s = sources["ckpt use_ema=False"]  # logits of the trained weights

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.logits = logits_of(pl_module.net)
            pl_module.net.train()

    seen = AtStart()
    model = ImageClassifier(arch="convnet", num_classes=NUM_CLASSES, arch_args=CONVNET_ARGS, lr=0.05, lr_reference_batch=None)
    data = TensorDataset(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.randint(0, NUM_CLASSES, (8,)))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[WeightEMA(decay=0.5), seen],
                        default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=4), ckpt_path=s.path)
    torch.testing.assert_close(seen.logits, s.logits, atol=1e-6, rtol=0)
    assert model.data_config == CUSTOM_DC.as_dict()


def test_checkpoint_of_another_class_count_is_one_clear_error(sources):
    from zoo.base import ImageClassifier
    from zoo.weights import WeightsError

    with pytest.raises(WeightsError, match=r"classifier has 3 classes but the model/data has 5"):
        ImageClassifier.load_from_checkpoint(sources["ckpt (EMA)"].path, map_location="cpu", num_classes=5)


if __name__ == "__main__":
    # through the package, so that `zoo validate --trainer.callbacks tests.test_loading_paths.Capture`
    # and this table share one Capture class
    from tests.test_loading_paths import print_table as _print_table

    _print_table()
