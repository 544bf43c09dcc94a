"""Recipe fidelity: derived progressive-resizing ramps, thin epoch aliases, cudnn.benchmark."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from callbacks.progressive_resize import ProgressiveResize, default_ramp

RECIPES = Path(__file__).resolve().parent.parent / "launch" / "recipes"
# libffcv/ffcv-imagenet rn18_configs/ and rn50_configs/rn*_<E>_epochs.yaml: resolution.start_ramp, end_ramp
PUBLISHED_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}


@pytest.mark.parametrize("epochs", sorted(PUBLISHED_RAMPS))
def test_derived_ramp_is_ffcv_imagenets_published_one(epochs):
    assert default_ramp(epochs) == PUBLISHED_RAMPS[epochs]


def _body(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
@pytest.mark.parametrize("epochs", sorted(PUBLISHED_RAMPS))
def test_one_recipe_plus_max_epochs_is_each_published_config(arch, epochs):
    base = _body(RECIPES / f"{arch}.yaml")
    alias = _body(RECIPES / f"{arch}_ffcv_{epochs}ep.yaml")
    assert alias["trainer"]["max_epochs"] == epochs
    base["trainer"]["max_epochs"] = epochs
    assert alias == base  # a thin alias: only max_epochs differs
    (cb,) = [c for c in base["trainer"]["callbacks"] if c["class_path"].endswith("ProgressiveResize")]
    resize = ProgressiveResize(**cb["init_args"])
    assert resize.ramp(epochs) == PUBLISHED_RAMPS[epochs]


class _DM:
    def __init__(self):
        self.res = []

    def set_train_resolution(self, res):
        self.res.append(res)


def test_explicit_ramp_past_the_last_epoch_warns_and_derived_ramp_follows_max_epochs():
    trainer = SimpleNamespace(max_epochs=40, current_epoch=0, datamodule=_DM())
    with pytest.warns(UserWarning, match="never reaches 192"):
        ProgressiveResize(start_ramp=65, end_ramp=76).on_fit_start(trainer, None)
    derived = ProgressiveResize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        derived.on_fit_start(trainer, None)
    for epoch in range(40):
        trainer.current_epoch = epoch
        derived.on_train_epoch_start(trainer, None)
    assert trainer.datamodule.res[0] == 160 and trainer.datamodule.res[-1] == 192
    with pytest.raises(ValueError, match="max_epochs"):
        ProgressiveResize().on_fit_start(SimpleNamespace(max_epochs=-1, current_epoch=0, datamodule=_DM()), None)


def test_gpu_recipes_turn_on_cudnn_benchmark_and_name_their_augmentation():
    for path in RECIPES.glob("*.yaml"):
        cfg = _body(path)
        if cfg["trainer"].get("accelerator") == "gpu":
            assert cfg["trainer"].get("benchmark") is True, path.name
        aa = cfg["model"].get("auto_augment")
        assert aa in (None, "ta_wide") or aa.startswith("rand-"), f"{path.name}: name timm's or torchvision's variant"
