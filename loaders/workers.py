"""Loader worker processes and the job's signals.

SLURM (at a job's time limit), torchrun's shutdown and `kill -- -PGID` signal every process of a job, the loader's
workers included. The training process stops on such a signal and writes out what it has done; its
workers must neither die of it (torch's loader would fail the training process first: "DataLoader worker is killed
by signal") nor end with an exception raised at whatever line they are on: one raised while a worker holds the
lock of the loader's shared done-event leaves the training process waiting on that lock forever when it ends the
loader (a run that never exits), and one raised in torch's worker loop prints a traceback.

So a worker leaves SIGTERM and SIGINT to the training process, which ends its workers itself when it stops: a
thread of the worker waits for the two signals and ends the worker, as torch's own handler does, only for a SIGTERM
from its parent (the loader's `terminate` of a worker that did not end in time); a worker whose parent is gone ends
on its own (torch's watchdog). SIGKILL still ends it at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import torch

_JOB_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def leave_signals_to_the_parent(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker takes SIGTERM and SIGINT as said in this module's doc."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS (whose workers are spawned): torch's handlers stay
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)  # already, where `started` forked the worker
    parent = os.getppid()

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(_JOB_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="clipmoe-worker-signals", daemon=True).start()


@contextlib.contextmanager
def _held_in_this_thread():
    """SIGTERM and SIGINT held back in this thread (the one whose mask a forked worker inherits) until the block
    ends: a worker is born with them blocked, so that no signal reaches it before `leave_signals_to_the_parent`
    runs, while torch's handlers (a SIGTERM from anyone but the parent kills) or the training process's are set."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a signal that came meanwhile is delivered now


def started(loader: torch.utils.data.DataLoader) -> Iterator:
    """`iter(loader)` for a loader with `leave_signals_to_the_parent` as its worker_init_fn: its workers start
    (fork) with the job's signals blocked."""
    if loader.num_workers == 0:
        return iter(loader)
    with _held_in_this_thread():
        return iter(loader)
