"""Imported once by the forkserver that starts DataLoader workers (workers.worker_start_method).

Each worker is forked from that server, so what is imported here is loaded once, not per worker.
The server ignores SIGUSR1 and SIGTERM as the workers do (workers.worker_ignores_job_signals):
``scancel --signal=USR1`` reaches every process of a job step, and a server killed by it could start
no more workers. It exits by itself when the training process that started it is gone.
The blocked mask it starts with (workers._start_helpers_deaf_to_job_signals) does not
cover SIGTERM: ``forkserver.ensure_running`` first starts the resource tracker, whose start
unblocks SIGINT and SIGTERM in the caller again, so these lines are needed.
"""

import signal

import datamodules.torchvision_backend  # noqa: F401 - torch, torchvision, PIL and the datasets' code

signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
