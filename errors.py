"""The project's user-facing errors. A leaf module: it imports nothing of the project, so any module may import it."""


class HalosError(ValueError):
    """A user-facing error: bad config, data, checkpoint or environment. Entry points print it without a traceback."""


class ConfigError(HalosError):
    """One or more invalid config values; the message lists each as `key: problem`."""
