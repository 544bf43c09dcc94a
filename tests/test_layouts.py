"""ImageNet as users have it: tiny fakes of the official release (tars + devkit) and of Kaggle's copy."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.folder import DataError
from datamodules.imagenet import ImageNetDataModule, count_classes
from tests.conftest import ramp_image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted, as ImageFolder orders them
NAMES = ["tench", "goldfish", "great white shark"]
VAL_LABELS = [2, 0, 1, 1, 0, 2, 0]  # label of val image k (an order unlike the sorted one)
RES = 32


def _jpeg(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(ramp_image(40 + seed % 7, 48, label)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k + 1:08d}"


def make_official(root: Path) -> Path:
    """ILSVRC2012_img_{train,val}.tar and ILSVRC2012_devkit_t12.tar.gz as torchvision parses them."""
    import scipy.io

    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for label, wnid in enumerate(WNIDS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(2):
                    _add(t, f"{wnid}_{i}.JPEG", _jpeg(label, i))
            _add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
        for k, label in enumerate(VAL_LABELS):
            _add(t, f"{_val_name(k)}.JPEG", _jpeg(label, k))
    # meta.mat: the devkit's synsets; ILSVRC2012_ID order differs from wnid order, one non-leaf
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    ids = {WNIDS[1]: 1, WNIDS[0]: 2, WNIDS[2]: 3}
    rows = [(ids[w], w, f"{n}, other name", "gloss", 0, np.zeros(0), 0, 2) for w, n in zip(WNIDS, NAMES)]
    rows.append((1001, "n00000001", "fish", "gloss", 3, np.array([1, 2, 3]), 1, 0))
    synsets = np.array(rows, dtype=[(f, "O") for f in fields])
    mat, gt = io.BytesIO(), "\n".join(str(ids[WNIDS[label]]) for label in VAL_LABELS) + "\n"
    scipy.io.savemat(mat, {"synsets": synsets})
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        _add(t, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        _add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt.encode())
    return root


def make_kaggle(root: Path) -> Path:
    images = root / "ILSVRC/Data/CLS-LOC"
    for label, wnid in enumerate(WNIDS):
        (images / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            (images / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(label, i))
    (images / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for k, label in enumerate(VAL_LABELS):
        (images / "val" / f"{_val_name(k)}.JPEG").write_bytes(_jpeg(label, k))
        lines.append(f"{_val_name(k)},{WNIDS[label]} 1 2 30 40 {WNIDS[label]} 5 5 20 20")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}, other name\n" for w, n in zip(WNIDS, NAMES)))
    return root


@pytest.fixture
def no_md5(monkeypatch):
    """The fakes cannot match torchvision's md5 of the real archives."""
    import torchvision.datasets.imagenet as tv

    monkeypatch.setattr(tv, "_verify_archive", lambda *a, **k: None)


def _check(dm: ImageNetDataModule) -> None:
    assert dm.classes == WNIDS and dm.class_names == NAMES and count_classes(dm.hparams.root) == 3
    dm.prepare_data()
    dm.setup("fit")
    for split, n in (("train", 6), ("val", len(VAL_LABELS))):
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        x, y = (torch.cat(t) for t in zip(*[(a, b) for a, b in loader]))
        assert len(y) == n
        # the B channel encodes the label the image was made with: images and labels stay paired
        assert torch.equal((x[:, 2].float().mean((1, 2)) - 40).div(80).round().long(), y)
    assert sorted(y.tolist()) == sorted(VAL_LABELS)


def _dm(root: Path) -> ImageNetDataModule:
    return ImageNetDataModule(root=str(root), backend="torchvision", batch_size=4, num_workers=0, train_res=RES,
                              val_res=RES, drop_last=False)


def test_official_release_is_extracted_once_with_devkit_names(tmp_path, no_md5):
    root = make_official(tmp_path / "imagenet")
    dm = _dm(root)
    _check(dm)
    assert dm.layout.kind == "official" and sorted(p.name for p in root.iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]  # the user's folder untouched
    extracted = dm.layout.images
    mtime = (extracted / ".complete").stat().st_mtime_ns
    _dm(root).prepare_data()
    assert (extracted / ".complete").stat().st_mtime_ns == mtime  # not extracted again


def test_kaggle_layout_reads_labels_and_names(tmp_path):
    _check(_dm(make_kaggle(tmp_path / "kaggle")))


@pytest.mark.parametrize("remove, message", [
    ("ILSVRC2012_img_val.tar", r"holds ILSVRC2012_img_train.tar, ILSVRC2012_devkit_t12.tar.gz but not ILSVRC2012_img_val.tar"),
    ("LOC_val_solution.csv", r"looks like Kaggle's ImageNet but lacks LOC_val_solution.csv"),
])
def test_incomplete_layout_says_what_is_missing(tmp_path, remove, message):
    root = make_official(tmp_path / "d") if remove.startswith("ILSVRC") else make_kaggle(tmp_path / "d")
    (root / remove).unlink()
    with pytest.raises(DataError, match=message) as e:
        _dm(root).classes  # noqa: B018
    assert "\n" not in str(e.value)


def test_official_archive_with_another_md5_says_download_it_again(tmp_path):
    """Without no_md5: the fake archives fail torchvision's md5 check, as a truncated download does."""
    root = make_official(tmp_path / "imagenet")
    with pytest.raises(DataError) as e:
        _dm(root).classes  # noqa: B018
    msg = str(e.value)
    assert "\n" not in msg and "MD5 checksum differs from image-net.org's" in msg and "download it again" in msg
    assert "ILSVRC2012_devkit_t12.tar.gz" in msg  # the devkit is read first
    assert "not present" not in msg and "tmp" not in msg.split(":")[-1]
