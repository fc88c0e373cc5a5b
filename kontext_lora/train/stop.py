"""Stopping a run cleanly: SIGTERM or SIGINT asks the loop to save a resumable checkpoint and exit.

Without this, SIGTERM killed the process where it stood and Ctrl-C raised KeyboardInterrupt mid-step: the work
since the last `output.save_every` checkpoint was lost. With it, the first signal only records itself; the loop
checks at the next step boundary (`requested`), writes `step-NNNNNN/` like a periodic checkpoint and raises
`TrainingStopped`, so `train.resume=latest` continues from exactly there. A second signal while that happens acts
at once (the default action), for a user who does not want to wait.

Signals belong to the process, so the record is a module-level one, set while a function decorated with
`stop_on_signal` runs.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the stop signal received while the decorated function runs

F = TypeVar("F", bound=Callable[..., Any])


class TrainingStopped(KeyboardInterrupt):
    """The run was stopped by a signal after saving a checkpoint; the message names it and how to resume.

    A KeyboardInterrupt, so that a sweep records the run as interrupted and stops, as it does for Ctrl-C.
    """


def _handle(signum: int, frame: object) -> None:
    _received.append(signum)
    for sig in STOP_SIGNALS:  # the next one acts at once
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


def stop_on_signal(function: F) -> F:
    """Run `function` with SIGTERM / SIGINT recorded instead of acted on (main thread only; elsewhere as before)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set from there
            return function(*args, **kwargs)
        previous = {sig: signal.signal(sig, _handle) for sig in STOP_SIGNALS}
        _received.clear()
        try:
            return function(*args, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _received.clear()

    return wrapper  # type: ignore[return-value]


def requested(accelerator) -> str | None:
    """The name of the stop signal if any process got one, else None; with several processes a collective, so
    that all of them checkpoint at the same step."""
    if accelerator.num_processes == 1:
        return signal.Signals(_received[0]).name if _received else None
    flag = torch.tensor([float(bool(_received))], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return None
    return signal.Signals(_received[0]).name if _received else "a signal to another process"
