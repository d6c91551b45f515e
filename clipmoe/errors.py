"""The one exception type clipmoe raises for bad user input (configs, checkpoints, data, tags)."""


class ClipmoeError(Exception):
    """A user-facing error whose message is one line that says what is wrong and where."""


class ConfigError(ClipmoeError, ValueError):
    """An invalid configuration: unknown key, wrong type or impossible value. Names the key."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name if it has none), for a one-line error that
    wraps a library's exception."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def error_line(e: BaseException) -> str:
    """"Type: message" in one line. An exception re-raised from a DataLoader worker carries the worker's whole
    traceback as its message; its last line is the original "module.Type: message"."""
    text = str(e).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1][:500]
    return f"{type(e).__name__}: {first_line(e, limit=500)}"


def make_folder(path, what: str):
    """`path` as a folder, made with its parents if missing; a path that cannot be one (under a file, no
    permission) is a ClipmoeError naming `what` (the option or key that gave it). Called before long work, so
    that it never ends in an unwritable output. Returns the path as a `pathlib.Path`."""
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipmoeError(f"{what}: cannot create {path}: {e.strerror or e}") from None
    return path


def write_failure(e: BaseException, folder) -> str:
    """Why a write into `folder` failed, in one line, with the free space of its disk: torch.save says "unexpected
    pos 515776 vs 515728" when the disk fills, safetensors "I/O error: No space left on device"."""
    import shutil

    why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    if "unexpected pos" in why:  # torch's zip writer, after a short write
        why = "the file could not be written in full"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return why
    return f"{why}; {free / 2**20:.1f} MiB free on the disk of {folder}"
