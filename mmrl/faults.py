"""What the trainer does when something goes wrong mid-run: preemption signals and non-finite updates.

* :class:`StopRequest` — SIGTERM / SIGINT (a cluster's preemption notice, Ctrl-C) ask the run to finish the
  current rollout step, save a checkpoint, flush its logs and exit 0; a second signal exits at once.
* :class:`UpdateGuard` — a loss or gradient that is NaN/inf never reaches the weights: the update is
  skipped (counted, logged); after ``max_consecutive`` skips in a row the run stops with a clear error,
  since something is systematically wrong (a reward scale, a learning rate, a broken sample).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs handlers for SIGTERM/SIGINT while active (a context manager); ``requested`` turns true on
    the first signal. Handlers can only be installed from the main thread; elsewhere this is inert."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            logger.warning("second %s: exiting now without saving", name)
            os._exit(128 + signum)
        self.requested = True
        self.signal_name = name
        logger.warning("%s received: finishing the current step, then saving a checkpoint and exiting "
                       "(send it again to exit at once)", name)


class NonFiniteUpdates(RuntimeError):
    """Too many optimizer updates in a row had a non-finite loss or gradient."""


class UpdateGuard:
    """Decides whether an optimizer update may be applied, and counts the ones that may not."""

    def __init__(self, max_consecutive: int, warn: bool = True) -> None:
        self.max_consecutive = max_consecutive
        self.warn = warn  # all processes skip together: one of them (the main one) says so
        self.skipped_total = 0
        self.consecutive = 0

    def check(self, loss: float, grad_norm: float, step: int, elsewhere_bad: bool = False) -> bool:
        """True if the update is safe to apply. ``elsewhere_bad``: another process saw a non-finite value
        (all processes skip together). Raises :class:`NonFiniteUpdates` after too many skips in a row."""
        if not elsewhere_bad and math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped_total += 1
        self.consecutive += 1
        what = ("loss" if not math.isfinite(loss) else "gradient" if not math.isfinite(grad_norm)
                else "loss or gradient on another process")
        if self.warn:
            logger.warning("optimizer step %d skipped: non-finite %s (loss=%s, grad_norm=%s); skipped so far: %d",
                           step, what, loss, grad_norm, self.skipped_total)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteUpdates(
                f"{self.consecutive} optimizer updates in a row had a non-finite loss or gradient (last at step "
                f"{step}); the weights were left untouched. Check the reward values, the learning rate and "
                "mixed precision, or raise max_consecutive_skips.")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive = int(state.get("consecutive", 0))
