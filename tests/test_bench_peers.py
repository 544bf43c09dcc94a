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


def test_phases_split_wall_time_at_each_tools_marks():
    from benchmarks.peers import phases

    zoo = [(1.0, "loading"), (5.0, "epoch 0 (1 of 3)  batch 1/23  loss 2.3  first batch after 1.0 s"),
           (9.0, "epoch 0 (1 of 3)  done in 0:04"), (13.0, "epoch 1 (2 of 3)  done in 0:04"),
           (19.0, "epoch 2 (3 of 3)  done in 0:06")]
    assert phases("zoo", zoo, 21.0) == {"first_batch": 5.0, "per_epoch": 5.0, "tail": 2.0}
    timm = [(3.0, "Train: 0 [   0/23 (  0%)]  Loss: 2.4"), (4.0, "Test: [   0/4]  Acc@1: 1"),
            (6.0, "Test: [   4/4]  Acc@1: 9"), (7.0, "Train: 1 [   0/23 (  0%)]"), (10.0, "Test: [   4/4]  x")]
    assert phases("timm", timm, 10.5) == {"first_batch": 3.0, "per_epoch": 4.0, "tail": 0.5}
    tv = [(2.0, "Epoch: [0]  [ 0/24]  eta"), (5.0, "Test:  Acc@1 80.1 Acc@5 99.0")]
    assert phases("torchvision", tv, 6.0) == {"first_batch": 2.0, "per_epoch": None, "tail": 1.0}
    assert phases("zoo", [], 3.0) == {"first_batch": None, "per_epoch": None, "tail": None}


def test_run_one_stamps_each_line_when_it_arrives(tmp_path):
    import os
    import sys

    from benchmarks.peers import run_one

    code = "import time; print('a', flush=True); time.sleep(1.0); print('b', flush=True)"
    wall, cpu, log, rc, stamped = run_one([sys.executable, "-c", code], tmp_path / "r", dict(os.environ), 30)
    assert rc == 0 and log == "a\nb" and [line for _, line in stamped] == ["a", "b"]
    assert stamped[1][0] - stamped[0][0] >= 0.9 and wall >= stamped[1][0]
    assert (tmp_path / "r" / "log.txt").read_text().splitlines()[1].endswith("  b")
