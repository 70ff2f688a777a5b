"""The signals that stop a run, and a context manager that handles them for a while.

timeout, SLURM's scancel and preemption send SIGTERM, Ctrl-C sends SIGINT, closing the terminal
or the SSH session sends SIGHUP, and SLURM's `--signal=USR1@N` sends SIGUSR1 before a time
limit: the trainer saves and exits 128+N on each,
and the launchers pass each on to the runs they started. No torch here: the launchers import it.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


@contextmanager
def handling(signals: Sequence[int], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Run the body with `handler` for `signals`, then put the previous handlers back."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
