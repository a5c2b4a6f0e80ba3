"""Terminal output that shares the screen with progress bars.

Lines go through tqdm, which clears any active bar, writes the line and redraws the bar below it, so messages never
land in the middle of a bar. Metrics print as `key=value` numbers, not as a dict of quoted strings.
"""
import logging
import sys
from typing import Mapping

from tqdm import tqdm


def say(message: str) -> None:
    """Prints one line to stdout above any progress bar."""
    tqdm.write(message, file=sys.stdout)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """`loss/train=1.2346 grad_norm=0.5 counters/examples=64`: floats with 5 significant digits, ints as they are."""
    return " ".join(f"{key}={value:.5g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in metrics.items())


class ProgressBarHandler(logging.Handler):
    """A logging handler that writes records to stderr through tqdm."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the code that logs
            self.handleError(record)


def route_project_logs() -> None:
    """Sends the project's log records (logger `halos` and below, e.g. the data warnings) through tqdm. Entry points
    call this once; without it the root logger's handler (Hydra's) or Python's last-resort one prints them straight
    onto the bar. They no longer propagate to the root logger, which would print them a second time."""
    logger = logging.getLogger("halos")
    if not any(isinstance(handler, ProgressBarHandler) for handler in logger.handlers):
        logger.addHandler(ProgressBarHandler())
    logger.propagate = False
