"""How often progress bars redraw: on a terminal, tqdm's 0.1 s; in a log file (SLURM's, nohup's), where each
redraw stays as another line, every 30 s. Torch-free: the command line reads it before anything loads tqdm."""
from __future__ import annotations


def bar_interval(stream) -> float:
    isatty = getattr(stream, "isatty", None)
    return 0.1 if isatty is not None and isatty() else 30.0


def log_file_defaults(stream) -> dict:
    """The environment that gives every tqdm bar of a process `bar_interval(stream)`, zero-shot and shard
    writing included (tqdm reads TQDM_MININTERVAL when it loads, so set it before)."""
    interval = bar_interval(stream)
    return {} if interval == 0.1 else {"TQDM_MININTERVAL": str(interval)}
