"""Lightning callbacks of the zoo (EMA, BN statistics, ensembles, diagnosis, preemption, ...)."""

import logging

# The package's log lines (``logging.getLogger(__name__)`` in each module) show at INFO, on stderr
# when the application configured no logging, as Lightning's own do (lightning/pytorch/__init__.py);
# else they propagate to its handlers. Silence or redirect them with the standard configuration:
# ``logging.getLogger("callbacks").setLevel(logging.WARNING)``.
_log = logging.getLogger(__name__)
if _log.level == logging.NOTSET:
    _log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.propagate = False
