"""The up-front check of the `scheduler` section that its schema cannot do alone."""
from __future__ import annotations

from optim.schedulers import build_scheduler
from options.schema import Config


def check_config(cfg: Config) -> None:
    """Raise ValueError, its message starting with the config key, for schedule settings that
    cannot work together (e.g. more repeated cyclic epochs than the run has).

    Ranges and orderings inside one block (min_lr <= max_lr, betas, momentum, ...) are the
    schema's (options/schema.py) and are not repeated here. The schedule is built as if the
    run were just longer than its warmup: whether an iteration-based warmup fits the real
    run needs its length in optimizer steps, which build_scheduler checks when the engine
    builds the schedule.
    """
    build_scheduler(cfg.scheduler, total_iterations=cfg.scheduler.warmup_iterations + 1)
