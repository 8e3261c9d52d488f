"""Progress lines for long loops: INFO at most every few seconds, DEBUG in between."""
from __future__ import annotations

import logging
import time


class ProgressLog:
    """Call it each iteration; a line reaches INFO when `every` seconds passed since the last one (or `last`)."""

    def __init__(self, logger: logging.Logger, every: float = 10.0):
        self.logger, self.every = logger, every
        self.started = self.shown = time.perf_counter()

    def __call__(self, message: str, *args, last: bool = False) -> None:
        now = time.perf_counter()
        if last or now - self.shown >= self.every:
            self.shown = now
            self.logger.info(message + " (%.1fs)", *args, now - self.started)
        else:
            self.logger.debug(message, *args)
