"""ThrottledProgressBar: Lightning's bar, redrawn at most every min_interval_s, on a terminal;
plain lines every log_interval batches elsewhere."""

import io
import re
import sys

import pytest
from torch.utils.data import DataLoader, IterableDataset

from callbacks.progress import ThrottledProgressBar
from tests.test_base import TinyData, model, trainer


def _spy_bar(bar):
    """Record the count at each redraw of the train bar (Lightning sets n, then refresh())."""
    drawn = []

    def init_train_tqdm():
        tq = ThrottledProgressBar.init_train_tqdm(bar)
        refresh = tq.refresh

        def spy(*a, **kw):
            drawn.append(tq.n)
            return refresh(*a, **kw)

        tq.refresh = spy
        return tq

    bar.init_train_tqdm = init_train_tqdm
    return drawn


@pytest.mark.parametrize("interval,expected", [(0.0, [1, 2, 3, 4]), (1e9, [1, 4])])
def test_train_bar_redraws_at_most_every_interval_and_always_at_the_last_batch(interval, expected):
    bar = ThrottledProgressBar(min_interval_s=interval, plain=False)
    drawn = _spy_bar(bar)
    trainer(max_epochs=1, limit_val_batches=0, enable_progress_bar=True, callbacks=[bar]).fit(model(), datamodule=TinyData())
    counts = [n for i, n in enumerate(drawn) if n and (i == 0 or drawn[i - 1] != n)]  # set_postfix redraws too
    assert counts == expected  # 4 batches: the first draws at once, the last always


class _Unsized(IterableDataset):
    def __init__(self, dm):
        self.dm = dm

    def __iter__(self):
        for i in range(0, len(self.dm.y), self.dm.batch_size):
            yield self.dm.x[i:i + self.dm.batch_size], self.dm.y[i:i + self.dm.batch_size]


def test_an_epoch_of_unknown_length_ends_showing_every_batch():
    dm = TinyData(n=40)  # 5 batches, length unknown to the bar
    bar = ThrottledProgressBar(min_interval_s=1e9, plain=False)
    drawn = _spy_bar(bar)
    loader = DataLoader(_Unsized(dm), batch_size=None)
    trainer(max_epochs=1, enable_progress_bar=True, callbacks=[bar]).fit(model(), train_dataloaders=loader)
    assert drawn[-1] == 5 and bar.train_progress_bar.n == 5


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="min_interval_s"):
        ThrottledProgressBar(min_interval_s=-1)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _fit_printing(monkeypatch, stdout, epochs=3, **bar_kw):
    monkeypatch.setattr(sys, "stdout", stdout)
    bar = ThrottledProgressBar(**bar_kw)
    dm = TinyData(n=80)  # 10 batches of 8
    trainer(max_epochs=epochs, limit_val_batches=2, enable_progress_bar=True, callbacks=[bar]).fit(model(), datamodule=dm)
    return stdout.getvalue()


def test_output_that_is_not_a_terminal_gets_plain_lines(monkeypatch):
    """A Slurm log or a pipe: no carriage-return redraws, one line every log_interval batches and
    one per epoch (with loss, rate and time left), whatever the number of batches."""
    out = _fit_printing(monkeypatch, io.StringIO(), log_interval=4)
    assert "\r" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    # per epoch: batches 4 and 8 of 10 (the fit's first batch too), then the epoch's line
    assert len(lines) == 3 * 3 + 1, out
    assert len(out.splitlines()) <= len(lines) + 5, out  # nothing else of the bar's
    assert re.search(r"^epoch 0 \(1 of 3\)  batch 1/10  .*loss \S+  first batch after \d+\.\d s$", lines[0]), lines[0]
    assert re.search(r"^epoch 0 \(1 of 3\)  batch 4/10  .*loss \S+  \d+\.\d img/s  ETA \d+:\d\d$", lines[1]), lines[1]
    ends = [ln for ln in lines if " done in " in ln]
    assert len(ends) == 3 and all("val/acc1" in ln and "img/s" in ln for ln in ends), ends
    assert ends[-1].endswith("ETA 0:00"), ends[-1]


def test_a_terminal_keeps_the_bar(monkeypatch):
    out = _fit_printing(monkeypatch, _Terminal(), epochs=1, min_interval_s=0)
    assert "\r" in out and "10/10" in out
    assert not re.search(r"^epoch 0 ", out, re.M)


def test_log_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="log_interval"):
        ThrottledProgressBar(log_interval=0)


def test_plain_lines_of_a_fit_resumed_inside_an_epoch(capsys):
    """A requeued job resumes from an hpc checkpoint inside an epoch: Lightning calls no
    on_train_epoch_start before its first batch, and the lines must still count it."""
    import types

    import torch

    from callbacks.progress import _Lines

    bar = ThrottledProgressBar(plain=True, log_interval=2)
    bar.get_metrics = lambda trainer, pl_module: {"loss": 0.5}
    fake_trainer = types.SimpleNamespace(max_epochs=3, current_epoch=1)
    type(bar).total_train_batches = property(lambda self: 4)
    try:
        lines = _Lines(bar, fake_trainer)
        lines.batch(None, (torch.zeros(8, 3, 4, 4), torch.zeros(8)), batch_idx=1)  # no epoch_start first
    finally:
        del type(bar).total_train_batches
    assert capsys.readouterr().out.startswith("epoch 1 (2 of 3)  batch 2/4  loss 0.5")
