"""The project's user-facing errors. A leaf module: it imports nothing of the project, so any module may import it."""
from typing import Sequence


class HalosError(ValueError):
    """A user-facing error: bad config, data, checkpoint or environment. Entry points print it without a traceback."""


class ConfigError(HalosError):
    """One or more invalid config values; the message lists each as `key: problem`."""

    @classmethod
    def listing(cls, problems: Sequence[str]) -> "ConfigError":
        """The error for `problems`: one line for a single problem, else their count and one line each."""
        if len(problems) == 1:
            return cls(f"invalid config: {problems[0]}")
        return cls(f"invalid config ({len(problems)} problems):\n  - " + "\n  - ".join(problems))
