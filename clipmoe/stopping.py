"""How training stops early. Ctrl-C and SIGTERM become exceptions, never in the middle of an optimizer update: at
once in one process (`StopNow`); on several, the ranks agree at every step's start and stop at the same step, so
that they can write a checkpoint together (`StopVote`). The loader's workers leave both signals to the training
process (`loaders.workers`)."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

import loaders


class Terminated(KeyboardInterrupt):
    """SIGTERM during `train`: what `kill`, `timeout`, SLURM (before it kills a job at its time limit or to
    preempt it) and torchrun's shutdown send first. Training stops as at Ctrl-C."""

    signum = signal.SIGTERM

    def __init__(self, message: str = "terminated (SIGTERM)"):
        super().__init__(message)


def _stop_with(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _next_or_stop(batches, signals: list):
    """The next batch, or None where the loader failed after this process got a signal: a `pipe:` shard's command
    (curl, aws) gets the job's signal too, and its death is the signal's doing, not the data's."""
    try:
        return next(batches)
    except Exception:
        if not signals:
            raise
        return None


class _SignalHandling:
    """SIGINT and SIGTERM taken by `_handle` from `install` until `restore`: only where their handler is Python's
    or the default, in the main thread (a handler someone else set stays theirs)."""

    def __init__(self):
        self.signals, self._replaced, self._pid = [], {}, os.getpid()

    def install(self) -> Callable[[], None]:
        """Returns the function that puts the previous handlers back."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
                    self._replaced[s] = signal.signal(s, self._take)
        return self.restore

    def restore(self) -> None:
        for s, handler in self._replaced.items():
            signal.signal(s, handler)
        self._replaced.clear()

    def _take(self, signum, frame):
        if os.getpid() == self._pid:  # not a child forked with this handler, before its own: the signal is for training
            self._handle(signum)

    def _handle(self, signum: int) -> None:
        raise NotImplementedError


class StopNow(_SignalHandling):
    """Stopping one training process. Ctrl-C and SIGTERM raise at once (KeyboardInterrupt, `Terminated`), but not in
    the middle of an update (`held`, around the optimizer's step, which updates the parameters one tensor at a
    time): there they are raised when it ends. Each signal is also noted, and the next step's start raises it
    again: Python drops an exception raised in a finalizer, an at-fork hook or a weakref callback ("Exception
    ignored in ..."), and the DataLoader runs such code as it starts and ends its workers; without the note a
    signal caught there would be lost and the run go on.

    Once training stops (`restore`), a second signal acts as it would without clipmoe."""

    agreed = True  # one process: it stopped at the step it is at

    def __init__(self):
        super().__init__()
        self._holding = False

    def _handle(self, signum: int) -> None:
        self.signals.append(signum)
        if not self._holding:
            raise _stop_with(signum)

    @contextlib.contextmanager
    def held(self):
        """Signals noted, not raised, until the block ends; then the first of them is raised."""
        noted, self._holding = len(self.signals), True
        try:
            yield
        finally:
            self._holding = False
        if len(self.signals) > noted:
            raise _stop_with(self.signals[noted])

    def next_batch(self, batches, rank: int):
        batch = None if self.signals else _next_or_stop(batches, self.signals)
        if self.signals:  # raised once already, and lost where it was raised; or raised while the loader failed
            raise _stop_with(self.signals[0])
        return batch

    def close(self) -> None:
        self.restore()


class StopVote(_SignalHandling):
    """Stopping together on several processes. A rank that stops alone leaves the others waiting in the next
    collective (DDP's gradient all-reduce) until the launcher kills them, and no checkpoint can be written. So
    here a rank's first Ctrl-C or SIGTERM is only noted, and every step starts with `agree`: one all-reduce of
    three integers over a gloo group (on the CPU: no wait for the GPU) saying what each rank wants. If any rank
    got a signal or a data error, every rank stops at that step's start, with the same weights and step count.

    A second signal stops its process at once (exit status 128 + signal), writing nothing more, as it would
    without clipmoe."""

    def __init__(self, group=None):
        super().__init__()
        self.group = group
        self.agreed = False  # whether the ranks agreed to stop (so every rank stopped at the same step)

    @classmethod
    def for_world(cls) -> "StopVote":
        # gloo's all-reduce of a CPU tensor; under NCCL a side group (every rank creates it, in the same order)
        return cls(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))

    def _handle(self, signum: int) -> None:
        if self.signals:  # the second: now, without writing (mid-update weights must not be saved)
            self.restore()
            raise SystemExit(128 + signum)
        self.signals.append(signum)

    def held(self):
        return contextlib.nullcontext()  # signals are only noted, never raised mid-step

    def next_batch(self, batches, rank: int):
        """The step's batch once every rank can go on; else raises, on every rank alike, what they stop with."""
        try:
            batch, data_error = _next_or_stop(batches, self.signals), None
        except loaders.DataError as e:
            batch, data_error = None, e
        stop = self.agree(rank, data_error)
        if stop is not None:
            self.agreed = True
            raise stop
        return batch

    def agree(self, rank: int, data_error: Optional[Exception]) -> Optional[BaseException]:
        """What every rank stops with at this step's start, the same on all (None: go on): this rank's data error,
        or a note of another rank's; else SIGTERM's `Terminated`; else Ctrl-C's KeyboardInterrupt."""
        want = torch.tensor([signal.SIGINT in self.signals, signal.SIGTERM in self.signals,
                             rank + 1 if data_error is not None else 0], dtype=torch.int64)
        dist.all_reduce(want, op=dist.ReduceOp.MAX, group=self.group)
        sigint, sigterm, failed = want.tolist()
        if failed:
            return data_error or loaders.DataError(f"the training data of rank {failed - 1} stopped the run (that "
                                                   "rank's error says why)")
        if sigterm:
            return Terminated()
        return KeyboardInterrupt() if sigint else None

    def close(self) -> None:
        self.restore()
        if self.group is not None:
            dist.destroy_process_group(self.group)
