"""Host time WeightEMA.update spends finding the tensors it averages: a state_dict() walk per
update (before) vs the module dicts remembered at fit start (callbacks/ema.py: _locate/_current).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ema_lookup.py

This is per-step host work, hidden behind a GPU-bound step but not behind a host-bound one (on
an H100 the whole update took 1.4 ms of host time for ConvNeXt-T, benchmarks/results/gpu.md).
Prints one table: median of 7 rounds of 100 lookups each, the two variants alternating.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import timm
    import torch

    from benchmarks._common import machine_line, write_result
    from callbacks.ema import WeightEMA

    class Holder(torch.nn.Module):  # what the callback reads: pl_module.net
        def __init__(self, net):
            super().__init__()
            self.net = net

    load = os.getloadavg()[0]
    rows = []
    for name in ("convnext_tiny", "resnet50"):
        m = Holder(timm.create_model(name))
        ema = WeightEMA(decay=0.999)
        ema.on_fit_start(None, m)

        def walk():
            current = ema._tracked(m)
            return [current[k] for k in ema.ema]

        def remembered():
            return ema._current(m)

        assert ema._where is not None and all(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(walk(), remembered()))
        times: dict[str, list[float]] = {"walk": [], "remembered": []}
        for _ in range(7):
            for label, fn in (("walk", walk), ("remembered", remembered)):
                t = time.perf_counter()
                for _ in range(100):
                    fn()
                times[label].append((time.perf_counter() - t) / 100 * 1e6)
        w, r = statistics.median(times["walk"]), statistics.median(times["remembered"])
        rows.append(f"| {name} | {len(ema.ema)} | {w:.1f} | {r:.1f} | {w / r:.0f}x |")
    lines = ["# WeightEMA: finding the averaged tensors, host time per update", "",
             "Command: `python benchmarks/ema_lookup.py`", "", machine_line("cpu", load), "",
             "| model | tensors | state_dict walk (us) | remembered dicts (us) | faster |",
             "| --- | ---: | ---: | ---: | ---: |", *rows]
    write_result(REPO / "benchmarks/results/ema_lookup.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
