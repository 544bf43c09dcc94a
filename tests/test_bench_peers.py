"""benchmarks/peers.py: its data (scikit-learn's digits as an ImageFolder) and `zoo bench peers`."""

import pytest

from launch import bench


def test_digits_folder_is_a_32px_imagefolder_split_1500_297(tmp_path):
    pytest.importorskip("sklearn")
    from PIL import Image

    from benchmarks.peers import digits_folder

    root = digits_folder(tmp_path / "digits")
    train, val = sorted((root / "train").rglob("*.png")), sorted((root / "val").rglob("*.png"))
    assert (len(train), len(val)) == (1500, 297)
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    im = Image.open(train[0])
    assert im.size == (32, 32) and im.mode == "RGB"
    assert not {p.name for p in train} & {p.name for p in val}  # no image in both splits
    assert digits_folder(root) == root  # reused, not rewritten


def test_zoo_bench_peers_without_the_peer_scripts_is_one_line(capsys, tmp_path):
    rc = bench.main(["peers", "--tools", "zoo,timm", "--data", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--timm-train" in err[0] and "benchmarks/README.md" in err[0]
