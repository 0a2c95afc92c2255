"""Signals that ask a training run to save a checkpoint and stop after the current step.

SIGTERM and SIGUSR1 are what SLURM and ``torchrun`` send before a time-out, a preemption or a
shutdown. SIGINT is Ctrl-C in a terminal: the first one is handled like SIGTERM, and a second
one raises ``KeyboardInterrupt`` at once, without saving.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Handlers that record the first stop signal for the training loop to act on.

    Attributes:
        received: Number of the first stop signal received since ``install``, or None.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._interrupts = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Replace the handlers of ``STOP_SIGNALS`` until ``restore`` is called.

        Handlers can only be set from the main thread. Elsewhere (a notebook's worker thread)
        nothing is installed and the signals keep their handlers.
        """
        for signal_number in STOP_SIGNALS:
            try:
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
            except ValueError:  # not the main thread
                break

    def restore(self) -> None:
        """Put back the handlers that ``install`` replaced."""
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
        self._previous.clear()

    def _handle(self, signal_number: int, frame: Any) -> None:
        if signal_number == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            logger.warning(
                "received SIGINT (Ctrl-C): saving a checkpoint after the current step, then "
                "stopping. Press Ctrl-C again to stop at once without saving"
            )
        if self.received is None:
            self.received = signal_number


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """Make a DataLoader worker ignore SIGINT (a ``worker_init_fn``).

    Ctrl-C sends SIGINT to every process in the terminal's foreground process group, and
    ``torchrun`` forwards it to each worker's process group. A DataLoader worker would exit on
    it, and then the main process could not load the batches it needs before it stops.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
