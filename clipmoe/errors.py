"""The one exception type clipmoe raises for bad user input (configs, checkpoints, data, tags)."""


class ClipmoeError(Exception):
    """A user-facing error whose message is one line that says what is wrong and where."""


class ConfigError(ClipmoeError, ValueError):
    """An invalid configuration: unknown key, wrong type or impossible value. Names the key."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name if it has none), for a one-line error that
    wraps a library's exception."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
