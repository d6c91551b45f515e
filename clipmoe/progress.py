"""How often progress bars redraw: on a terminal, tqdm's 0.1 s; in a log file (SLURM's, nohup's), where each
redraw stays as another line, every 30 s. Torch-free: the command line reads it before anything loads tqdm."""
from __future__ import annotations


def bar_interval(stream) -> float:
    isatty = getattr(stream, "isatty", None)
    return 0.1 if isatty is not None and isatty() else 30.0


def bar_intervals(stream) -> dict:
    """tqdm's arguments for `bar_interval(stream)`: its monitor thread also redraws a bar every `maxinterval`
    (10 s by default) whatever `mininterval` says, so both are set."""
    interval = bar_interval(stream)
    return {"mininterval": interval, "maxinterval": max(10.0, interval)}


def log_file_defaults(stream) -> dict:
    """The environment that gives every tqdm bar of a process `bar_intervals(stream)`, zero-shot and shard
    writing included (tqdm reads TQDM_* variables when it loads, so set them before)."""
    if bar_interval(stream) == 0.1:
        return {}
    return {f"TQDM_{key.upper()}": str(value) for key, value in bar_intervals(stream).items()}
