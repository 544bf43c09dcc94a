"""A pytest plugin: the units in which pytest-xdist workers take the tests.

`make test` runs ``-n 2 --dist loadgroup --no-loadscope-reorder`` (one worker per CPU, at most 4).
Under loadgroup a worker takes each unit whole, the next one when it is idle, in the order of the
collection (xdist's default reorder would put the units with the most tests first). The units:

- the Slurm tests together: the local cluster has one node, and a second test's job would queue
  behind the first's;
- each slow or multi-process test alone;
- the other tests by module: their module-scoped fixtures are built once.

The heavy units come first, so the short ones fill in at the end instead of one worker running a
100 s test while the other waits. A run without workers keeps file order.

xdist reads the ``xdist_group`` marks in its own collection hook, so this one runs first; under
pytest 9.2 xdist does not group at all (pytest-xdist#1386): pyproject.toml keeps pytest below it.
"""

from __future__ import annotations

import pytest


def unit(item: pytest.Item) -> tuple[int, str | None]:
    """(rank, xdist group): rank 0 runs first; group None is a unit of its own."""
    if item.get_closest_marker("slurm"):
        return 0, "slurm"
    if item.get_closest_marker("ddp") or item.get_closest_marker("slow"):
        return 1, None
    return 2, item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker: nothing to schedule
        return
    units = {id(item): unit(item) for item in items}
    items.sort(key=lambda item: units[id(item)][0])  # stable: file order within a rank
    for item in items:
        group = units[id(item)][1]
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
