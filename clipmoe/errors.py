"""The one exception type clipmoe raises for bad user input (configs, checkpoints, data, tags)."""


class ClipmoeError(Exception):
    """A user-facing error whose message is one line that says what is wrong and where."""


class ConfigError(ClipmoeError, ValueError):
    """An invalid configuration: unknown key, wrong type or impossible value. Names the key."""
