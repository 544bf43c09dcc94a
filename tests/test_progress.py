"""ThrottledProgressBar: Lightning's bar, redrawn at most every min_interval_s."""

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
    bar = ThrottledProgressBar(min_interval_s=interval)
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
    bar = ThrottledProgressBar(min_interval_s=1e9)
    drawn = _spy_bar(bar)
    loader = DataLoader(_Unsized(dm), batch_size=None)
    trainer(max_epochs=1, enable_progress_bar=True, callbacks=[bar]).fit(model(), train_dataloaders=loader)
    assert drawn[-1] == 5 and bar.train_progress_bar.n == 5


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="min_interval_s"):
        ThrottledProgressBar(min_interval_s=-1)
