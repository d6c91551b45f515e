"""How training stops early. Ctrl-C and SIGTERM become exceptions between steps, never in the middle of an
optimizer update; on several processes the ranks agree at every step's start and stop at the same step, so that
they can write a checkpoint together (`StopVote`)."""
from __future__ import annotations

import contextlib
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


def raise_terminated(signum, frame):
    raise Terminated


def terminate_as_interrupt() -> Callable[[], None]:
    """Makes SIGTERM raise `Terminated` until the returned function is called; only where the signal's default
    action (to die at once, writing nothing) is installed, in the main thread: a handler someone else set stays
    theirs."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None
    signal.signal(signal.SIGTERM, raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


STOPPING = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}


@contextlib.contextmanager
def held_interrupt():
    """Holds Ctrl-C (SIGINT) and SIGTERM until the block ends, so that they never leave the parameters half-updated
    (the optimizer updates them one tensor at a time). Only signals that Python's or clipmoe's own handler turns
    into an exception, in the main thread: a handler someone else set stays theirs."""
    held = [s for s, handler in STOPPING.items() if signal.getsignal(s) is handler]
    if threading.current_thread() is not threading.main_thread() or not held:
        yield
        return
    pending = []
    for s in held:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, STOPPING[s])
    if pending:
        raise Terminated if pending[0] == signal.SIGTERM else KeyboardInterrupt


class StopVote:
    """Stopping together on several processes. A rank that stops alone leaves the others waiting in the next
    collective (DDP's gradient all-reduce) until the launcher kills them, and no checkpoint can be written. So
    here a rank's first Ctrl-C or SIGTERM is only noted, and every step starts with `agree`: one all-reduce of
    three integers over a gloo group (on the CPU: no wait for the GPU) saying what each rank wants. If any rank
    got a signal or a data error, every rank stops at that step's start, with the same weights and step count.

    A second signal stops its process at once (exit status 128 + signal), writing nothing more, as it would
    without clipmoe."""

    def __init__(self, group=None):
        self.group, self.signals, self._replaced = group, [], {}
        self.agreed = False  # whether the ranks agreed to stop (so every rank stopped at the same step)

    @classmethod
    def for_world(cls) -> "StopVote":
        # gloo's all-reduce of a CPU tensor; under NCCL a side group (every rank creates it, in the same order)
        return cls(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))

    def install(self) -> Callable[[], None]:
        """Notes SIGINT and SIGTERM instead of raising them, where their handler is Python's, clipmoe's or the
        default (in the main thread); returns the function that puts the previous handlers back."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) in (STOPPING[s], signal.SIG_DFL, signal.default_int_handler):
                    self._replaced[s] = signal.getsignal(s)
                    signal.signal(s, self._note)
        return self.restore

    def restore(self) -> None:
        for s, handler in self._replaced.items():
            signal.signal(s, handler)
        self._replaced.clear()

    def _note(self, signum, frame):
        if self.signals:  # the second: now, without writing (mid-update weights must not be saved)
            self.restore()
            raise SystemExit(128 + signum)
        self.signals.append(signum)

    def next_batch(self, batches, rank: int):
        """The step's batch once every rank can go on; else raises, on every rank alike, what they stop with."""
        try:
            batch, data_error = next(batches), None
        except loaders.DataError as e:
            batch, data_error = None, e
        except Exception:  # the loader's workers got the job's signal too and ended (the loader's
            if not self.signals:  # _end_quietly_on_sigterm): this rank stops for the signal
                raise
            batch, data_error = None, None
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
