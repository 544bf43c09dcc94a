"""Ensembles: combiners and vote tie-break, diversity lowers NLL, stacked == looped, the
Ensemble callback (snapshots, evaluation, resume) and `zoo ensemble` refusing bad members."""

import pytest
import torch

from callbacks.ensemble import Ensemble, MemberRunner, combine, evaluate_members, metrics, ranking_scores
from tests.test_base import NUM_CLASSES, TinyData, trainer
from zoo.base import ImageClassifier


def test_vote_tie_break_is_deterministic():
    # 4 members, 3 classes: two vote class 2, two vote class 0 -> tie between 0 and 2
    probs = torch.tensor([[[0.1, 0.1, 0.8]], [[0.05, 0.05, 0.9]], [[0.6, 0.3, 0.1]], [[0.5, 0.2, 0.3]]])
    logits = probs.log()
    # mean probability: class 0 = 0.3125, class 2 = 0.525 -> class 2 wins the tie
    assert ranking_scores(logits, "vote").argmax(-1).item() == 2
    torch.testing.assert_close(combine(logits, "vote"), torch.tensor([[0.5, 0.0, 0.5]]))
    # equal mean probabilities too: the lowest class index
    sym = torch.tensor([[[0.7, 0.0, 0.3]], [[0.3, 0.0, 0.7]]]).log()
    assert ranking_scores(sym, "vote").argmax(-1).item() == 0
    # a vote majority is never overturned by probabilities
    maj = torch.tensor([[[0.0, 0.51, 0.49]], [[0.0, 0.51, 0.49]], [[0.0, 0.0, 1.0]]]).clamp_min(1e-9).log()
    assert ranking_scores(maj, "vote").argmax(-1).item() == 1


def test_mean_prob_and_mean_logit():
    logits = torch.randn(3, 5, 4)
    torch.testing.assert_close(combine(logits, "mean_prob"), logits.softmax(-1).mean(0))
    torch.testing.assert_close(combine(logits, "mean_logit"), logits.mean(0).softmax(-1))
    with pytest.raises(ValueError, match="unknown combiner"):
        combine(logits, "median")


def test_diverse_members_ensemble_nll_below_mean_member_nll():
    torch.manual_seed(0)
    n, c, m = 600, 10, 5
    y = torch.randint(0, c, (n,))
    # each member: right with a margin on 70% of the images, confidently wrong on its own
    # (independent) 30%: planted diversity
    logits = torch.randn(m, n, c)
    for i in range(m):
        wrong = torch.rand(n) < 0.3
        target = torch.where(wrong, (y + 1 + torch.randint(0, c - 1, (n,))) % c, y)
        logits[i, torch.arange(n), target] += 4.0
    rows = evaluate_members(logits, y, [f"m{i}" for i in range(m)], "mean_prob")
    mean_nll = sum(rows[f"m{i}"]["nll"] for i in range(m)) / m
    ens = rows["ensemble (mean_prob)"]
    assert ens["nll"] < mean_nll - 0.3
    assert ens["top1"] > max(rows[f"m{i}"]["top1"] for i in range(m))
    assert set(ens) == {"top1", "top5", "nll", "brier", "ece"}


def test_metrics_on_known_values():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    y = torch.tensor([0, 0])
    r = metrics(probs, y)
    assert r["top1"] == 0.5 and r["top5"] == 1.0
    assert r["nll"] == pytest.approx(-(torch.tensor(0.9).log() + torch.tensor(0.4).log()).item() / 2)
    assert r["brier"] == pytest.approx((0.01 + 0.01 + 0.36 + 0.36) / 2)
    # ECE: bin of 0.9 (acc 1) and bin of 0.6 (acc 0): (0.1 + 0.6) / 2
    assert r["ece"] == pytest.approx(0.35, abs=1e-6)


def _nets(k=3, **arch_args):
    out = []
    for s in range(k):
        torch.manual_seed(s)
        m = ImageClassifier(arch="convnet", num_classes=NUM_CLASSES, arch_args={"widths": [8, 16], **arch_args})
        # non-trivial BN buffers, so eval-mode BN matters
        for b in m.net.modules():
            if isinstance(b, torch.nn.BatchNorm2d):
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)
        out.append(m.net.eval())
    return out


def test_stacked_equals_looped():
    nets = _nets(3)
    x = torch.randn(6, 3, 24, 24)
    stacked = MemberRunner(nets, [0, 0, 0], stack=True)
    looped = MemberRunner(nets, [0, 0, 0], stack=False)
    assert any(len(idx) == 3 for idx, _ in stacked.groups)
    torch.testing.assert_close(stacked(x), looped(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(looped(x)[1], nets[1](x), rtol=1e-4, atol=1e-5)
    unfolded = MemberRunner(nets, [0, 0, 0], stack=True, fold=False)
    torch.testing.assert_close(unfolded(x), looped(x), rtol=1e-4, atol=1e-5)
    # mixed architectures: one stacked group plus a looped member, in the members' order
    other = _nets(1, skip=True)[0]
    mixed = MemberRunner(nets[:2] + [other], [0, 0, 1], stack=True)
    torch.testing.assert_close(mixed(x)[2], other(x), rtol=1e-4, atol=1e-5)
    assert [len(idx) for idx, _ in mixed.groups] == [2, 1]
    auto = MemberRunner(nets, [0, 0, 0])  # the default: convnets stacked on a GPU only (measured slower on CPU)
    torch.testing.assert_close(auto(x), looped(x), rtol=1e-4, atol=1e-5)
    assert auto.stack is (x.device.type == "cuda") and len(auto.groups) == (1 if auto.stack else 3)


def test_mlp_members_are_stacked_on_any_device():
    """MLPs stacked ran 1.1-1.7x the loop's speed on the CPU, logistic regression 0.5-0.9x
    (benchmarks/ensemble.py): the default stacks the first and loops the second."""
    from zoo.registry import create_network

    nets = []
    for s in range(3):
        torch.manual_seed(s)
        nets.append(create_network("mlp", num_classes=NUM_CLASSES, input_size=8, norm="batchnorm").eval())
        for b in nets[-1].modules():
            if isinstance(b, torch.nn.BatchNorm1d):
                b.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(5, 3, 8, 8)
    auto, looped = MemberRunner(nets, [0, 0, 0]), MemberRunner(nets, [0, 0, 0], stack=False)
    torch.testing.assert_close(auto(x), looped(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto(x)[2], nets[2](x), rtol=1e-4, atol=1e-5)
    assert auto.stack is True and [len(idx) for idx, _ in auto.groups] == [3]
    logreg = [create_network("logreg", num_classes=NUM_CLASSES, input_size=8).eval() for _ in range(3)]
    auto = MemberRunner(logreg, [0, 0, 0])
    torch.testing.assert_close(auto(x)[1], logreg[1](x), rtol=1e-4, atol=1e-5)
    assert auto.stack is (x.device.type == "cuda") and len(auto.groups) == (1 if auto.stack else 3)


@pytest.mark.slow
def test_ensemble_callback_snapshots_evaluates_and_resumes(tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs, ckpt=None):
        torch.manual_seed(0)
        m = ImageClassifier(arch="convnet", num_classes=NUM_CLASSES, arch_args={"widths": [8, 16]}, lr=0.05,
                            lr_reference_batch=None)
        ens = Ensemble(k=2, monitor="val/acc1")
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", filename="last", every_n_epochs=1)
        t = trainer(max_epochs=max_epochs, callbacks=[ens, ck], enable_checkpointing=True, limit_val_batches=2,
                    default_root_dir=tmp_path)
        t.fit(m, datamodule=TinyData(), ckpt_path=ckpt)
        return t, ens

    t, ens = run(3)
    assert len(ens.snapshots) == 2 and len(list((tmp_path / "snapshots").glob("*.pt"))) == 2
    out = capsys.readouterr().out
    assert "Ensemble of 2 snapshots on val" in out and "ensemble (mean_prob)" in out
    assert (tmp_path / "ensemble_reliability_val.png").stat().st_size > 1000
    full = [(s["epoch"], s["score"]) for s in ens.snapshots]
    # resume: 2 epochs, then from the newest checkpoint to 3: the same snapshots
    t2, _ = run(2)
    t3, ens3 = run(3, ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert [(s["epoch"], s["score"]) for s in ens3.snapshots] == full
    class WithTest(TinyData):
        def test_dataloader(self):
            return self.val_dataloader()

    t3.test(t3.lightning_module, datamodule=WithTest())
    assert "test_ensemble/nll" in t3.callback_metrics


def test_zoo_ensemble_refuses_different_num_classes(tmp_path, capsys):
    from launch.cli import main

    paths = []
    for i, nc in enumerate((4, 5)):
        m = ImageClassifier(arch="convnet", num_classes=nc, arch_args={"widths": [8, 16]})
        t = trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
        t.strategy.connect(m)
        p = tmp_path / f"m{i}.ckpt"
        t.save_checkpoint(p)
        paths.append(str(p))
    assert main(["ensemble", *paths, "--run.root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: ensemble members have different numbers of classes" in err and "m1.ckpt: 5" in err


def _save(tmp_path, name, num_classes, seed):
    torch.manual_seed(seed)
    m = ImageClassifier(arch="convnet", num_classes=num_classes, arch_args={"widths": [8, 16]})
    t = trainer(max_epochs=1)
    t.strategy.connect(m)
    p = tmp_path / name
    t.save_checkpoint(p)
    return str(p)


def test_zoo_ensemble_prints_the_table_and_writes_the_diagram(tiny_imagenet, tmp_path, capsys):
    from launch.cli import main

    paths = [_save(tmp_path, f"m{i}.ckpt", 3, i) for i in range(3)]
    rc = main(["ensemble", *paths, "--data.root", str(tiny_imagenet), "--data.backend", "torchvision",
               "--data.num_workers", "0", "--data.batch_size", "4", "--combine", "vote", "--run.root", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3 members, 9 val images" in out and "ensemble (vote)" in out and "best member (m" in out
    run = next((tmp_path / "ensemble").iterdir())
    assert (run / "reliability.png").stat().st_size > 1000 and (run / "ensemble.json").exists()


def test_vote_ece_of_calibrated_votes_is_zero():
    # 3 members, 3 classes, 6 images. Images 0-2: unanimous and right (confidence 1, accuracy 1).
    # Images 3-5: two of three members vote the predicted class (confidence 2/3), right on 2 of
    # the 3 images (accuracy 2/3). Perfectly calibrated: ECE 0 (the old path gave 0.42).
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    votes = torch.tensor([[0, 1, 2, 0, 1, 0],   # member 0
                          [0, 1, 2, 0, 1, 0],   # member 1
                          [0, 1, 2, 1, 2, 2]])  # member 2: the dissenter on images 3-5
    logits = torch.nn.functional.one_hot(votes, 3).float() * 5.0
    rows = evaluate_members(logits, y, ["a", "b", "c"], "vote")
    ens = rows["ensemble (vote)"]
    assert ens["top1"] == pytest.approx(5 / 6)
    assert ens["ece"] == pytest.approx(0.0, abs=1e-6)
    # all unanimous and right
    unanimous = torch.nn.functional.one_hot(y[:3].expand(3, 3), 3).float() * 5.0
    assert evaluate_members(unanimous, y[:3], ["a", "b", "c"], "vote")["ensemble (vote)"]["ece"] == pytest.approx(0.0, abs=1e-6)


def test_ece_from_confidence_and_correctness():
    from callbacks.ensemble import expected_calibration_error

    conf = torch.tensor([1.0, 1.0, 0.5, 0.5])
    correct = torch.tensor([True, False, True, False])
    # bin 1.0: accuracy 0.5 (gap 0.5, weight 1/2); bin 0.5: accuracy 0.5 (gap 0)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.25, abs=1e-6)
