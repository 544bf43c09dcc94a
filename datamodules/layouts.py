"""The ImageNet layouts users have, each read into ``(path, label)`` samples and class names.

- ``folder``: ``root/{train,val}/<class>/*`` (ImageFolder format; also what torchvision's
  ``datasets.ImageNet`` extracts to, with its ``meta.bin`` giving class names).
- ``official``: the image-net.org release as downloaded: ``ILSVRC2012_img_train.tar`` (one tar
  per class inside), ``ILSVRC2012_img_val.tar`` (50,000 files in one folder) and
  ``ILSVRC2012_devkit_t12.tar.gz`` (labels, class names). Extracted once (rank 0, in
  ``prepare``) into the zoo's cache by torchvision's own parsers
  (``torchvision.datasets.imagenet.parse_*_archive``), then read as ``folder``.
- ``kaggle``: the Kaggle copy (``imagenet-object-localization-challenge``):
  ``ILSVRC/Data/CLS-LOC/train/<wnid>/*``, a flat ``.../val/``, ``LOC_val_solution.csv`` (val
  labels) and ``LOC_synset_mapping.txt`` (class names). Read in place.
- ``flat``: images without class folders (a user's photos): only ``zoo predict`` reads them.

Class names: the first name of each synset (``n01440764`` -> ``tench``) where the layout has
them, else the folder names.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .folder import DataError, atomic_write_json, cache_dir_for, find_classes, is_image_file, scan_split, validate_root

OFFICIAL = {  # torchvision.datasets.imagenet.ARCHIVE_META's file names
    "train": "ILSVRC2012_img_train.tar",
    "val": "ILSVRC2012_img_val.tar",
    "devkit": "ILSVRC2012_devkit_t12.tar.gz",
}
KAGGLE_IMAGES = Path("ILSVRC/Data/CLS-LOC")
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
KAGGLE_NAMES = "LOC_synset_mapping.txt"
EXTRACTED = "imagenet-extracted"  # official release, extracted, under cache_dir_for(root)


@dataclass
class Layout:
    kind: str
    root: Path  # the user's folder
    classes: list[str]  # label order (sorted folder names / wnids, as ImageFolder)
    class_names: list[str] | None = None  # human-readable, same order
    images: Path | None = None  # where {train,val}/ are read from (official: the extracted copy)
    _val: list[tuple[str, int]] | None = field(default=None, repr=False)

    def is_prepared(self) -> bool:
        return self.kind != "official" or (_extracted(self.root) / ".complete").is_file()

    def prepare(self) -> None:
        """Extract the official archives once (local rank 0)."""
        if self.kind == "official" and not self.is_prepared():
            _extract_official(self.root)

    def samples(self, split: str) -> list[tuple[str, int]]:
        """``(path, label)`` of ``split`` in a fixed (sorted) order."""
        if self.kind == "flat":
            return [(p, -1) for p in _flat_images(self.root)]
        if self.kind == "kaggle" and split == "val":
            return self._kaggle_val()
        if not self.is_prepared():
            raise DataError(f"{self.root}: the ImageNet archives are not extracted yet: run prepare_data() (zoo fit does)")
        return scan_split(self.images / split, self.classes)

    def _kaggle_val(self) -> list[tuple[str, int]]:
        if self._val is None:
            label = {w: i for i, w in enumerate(self.classes)}
            val_dir = self.root / KAGGLE_IMAGES / "val"
            out = []
            with open(self.root / KAGGLE_VAL_LABELS, newline="") as f:
                for row in csv.DictReader(f):
                    wnid = row["PredictionString"].split()[0]  # "n01751748 x0 y0 x1 y1 ...": one class per image
                    if wnid not in label:
                        raise DataError(f"{KAGGLE_VAL_LABELS} names class {wnid} for {row['ImageId']}, which has no train/ folder")
                    out.append((str(val_dir / f"{row['ImageId']}.JPEG"), label[wnid]))
            missing = [p for p, _ in out if not os.path.isfile(p)]
            if missing:
                raise DataError(f"{len(missing)} val images listed in {KAGGLE_VAL_LABELS} are missing, e.g. {missing[0]}: re-download or unzip again")
            self._val = sorted(out)
        return self._val


def _flat_images(root: Path) -> list[str]:
    return sorted(e.path for e in os.scandir(root) if e.is_file() and is_image_file(e.name))


def _extracted(root: Path) -> Path:
    return cache_dir_for(root) / EXTRACTED


def _missing(root: Path, names) -> list[str]:
    return [n for n in names if not (root / n).exists()]


def detect(root: Path) -> Layout:
    """The layout of ``root``; DataError in one line saying what is missing when it is incomplete."""
    if not root.is_dir():
        validate_root(root)  # its one-line error for a missing folder
    present = [n for n in OFFICIAL.values() if (root / n).is_file()]
    if present:
        missing = _missing(root, OFFICIAL.values())
        if missing:
            raise DataError(f"{root} holds {', '.join(present)} but not {', '.join(missing)}: the official ImageNet "
                            "release needs all three files (image-net.org, 'ILSVRC2012' downloads)")
        meta = _official_meta(root)
        wnids = sorted(meta)
        return Layout("official", root, wnids, [meta[w][0] for w in wnids], images=_extracted(root))
    if (root / KAGGLE_IMAGES).is_dir() or (root / KAGGLE_VAL_LABELS).is_file():
        need = [str(KAGGLE_IMAGES / "train"), str(KAGGLE_IMAGES / "val"), KAGGLE_VAL_LABELS, KAGGLE_NAMES]
        missing = _missing(root, need)
        if missing:
            raise DataError(f"{root} looks like Kaggle's ImageNet but lacks {', '.join(missing)}: unzip the whole "
                            "imagenet-object-localization-challenge download into it")
        classes = find_classes(root / KAGGLE_IMAGES / "train")
        names = _synset_names(root / KAGGLE_NAMES)
        return Layout("kaggle", root, classes, [names.get(c, c) for c in classes], images=root / KAGGLE_IMAGES)
    if not (root / "train").exists() and not (root / "val").exists() and _flat_images(root):
        return Layout("flat", root, [], None, images=root)
    classes = validate_root(root)
    names = None
    if (root / "meta.bin").is_file():  # torchvision's datasets.ImageNet(root) extracted it
        from torchvision.datasets.imagenet import load_meta_file

        wnid_to_classes = load_meta_file(str(root))[0]
        names = [wnid_to_classes[c][0] if c in wnid_to_classes else c for c in classes]
    return Layout("folder", root, classes, names, images=root)


def _synset_names(path: Path) -> dict[str, str]:
    """``n01440764 tench, Tinca tinca`` lines -> {wnid: first name}."""
    out = {}
    for line in path.read_text().splitlines():
        wnid, _, names = line.strip().partition(" ")
        if wnid:
            out[wnid] = names.split(",")[0].strip() or wnid
    return out


def _official_meta(root: Path) -> dict[str, tuple[str, ...]]:
    """{wnid: class names} from the devkit, parsed once by torchvision into the cache's meta.bin."""
    from torchvision.datasets.imagenet import META_FILE, load_meta_file

    cache = cache_dir_for(root) / "devkit"
    if not (cache / META_FILE).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        try:
            _parse("devkit", root, tmp)
            os.replace(tmp / META_FILE, cache / META_FILE)  # atomic: ranks may parse at the same time
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_meta_file(str(cache))[0]


def _parse(part: str, root: Path, dest: Path) -> None:
    """torchvision's parser for ``part``, reading the archive in ``root`` and writing under ``dest``."""
    from torchvision.datasets import imagenet as tv

    archive = str(root / OFFICIAL[part])  # os.path.join(dest, absolute) is the absolute path
    parse = {"devkit": tv.parse_devkit_archive, "train": tv.parse_train_archive, "val": tv.parse_val_archive}[part]
    try:
        parse(str(dest), file=archive)
    except RuntimeError as e:  # torchvision's "archive ... not present ... or is corrupted": its md5 check
        if not Path(archive).is_file() or "corrupted" not in str(e):
            raise DataError(f"{archive} could not be read ({str(e).splitlines()[0]}): download it again") from e
        md5 = tv.ARCHIVE_META[part][1]
        raise DataError(f"{archive}: its MD5 checksum differs from image-net.org's ({md5}), so the file is "
                        "incomplete or damaged: download it again") from None


def _extract_official(root: Path) -> None:
    from torchvision.datasets.imagenet import META_FILE

    dest = _extracted(root)
    if dest.exists():
        shutil.rmtree(dest)  # an earlier extraction that did not finish
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EXTRACTED}.", dir=dest.parent))
    try:
        _parse("devkit", root, tmp)
        _parse("val", root, tmp)  # val/<wnid>/ from the devkit's ground truth
        _parse("train", root, tmp)  # train/<wnid>/ from the per-class tars
        assert (tmp / META_FILE).is_file()
        atomic_write_json(tmp / ".complete", {"source": str(root)})
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["Layout", "detect"]
