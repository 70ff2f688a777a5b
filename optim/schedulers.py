"""Learning-rate schedules as functions of (epoch, iteration), looked up in SCHEDULERS.

``iteration`` is the global optimizer-step count from 0; ``epoch`` counts from 0.

Warmup (shared by all, ml-cvnets semantics): while iteration < warmup_iterations,
    lr = warmup_init_lr + (peak_lr - warmup_init_lr) * iteration / warmup_iterations
where peak_lr is the schedule's max_lr (``fixed``: its lr). Iteration 0 therefore gives
warmup_init_lr and iteration warmup_iterations the schedule's own value.

After warmup, cosine, cyclic and polynomial read their progress through the run:
- epoch-based (default): progress = epoch / max_epochs. As in ml-cvnets, the epochs spent
  in warmup count as part of the run, so the LR may step down when warmup ends.
- iteration-based: progress = (iteration - W) / (max_epochs * iterations_per_epoch - W)
  with W = warmup_iterations, so the decay starts from the peak exactly where warmup ends.
div_by_ten counts epochs in both modes (a step schedule only changes at epoch boundaries);
fixed and plateau have no notion of progress.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Type

from options.config import ConfigError
from options.registry import Registry
from options.schema import SchedulerConfig


# ----------------------------------------------------------------------------- pure formulas
def warmup_lr(iteration: int, warmup_iterations: int, warmup_init_lr: float, peak_lr: float) -> float:
    """Linear ramp from warmup_init_lr (iteration 0) toward peak_lr (iteration warmup_iterations)."""
    return warmup_init_lr + (peak_lr - warmup_init_lr) * iteration / warmup_iterations


def cosine_lr(progress: float, max_lr: float, min_lr: float) -> float:
    """Half a cosine from max_lr (progress 0) to min_lr (progress 1)."""
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def polynomial_lr(progress: float, max_lr: float, min_lr: float, power: float) -> float:
    """max_lr (progress 0) decaying as (1 - progress)^power to min_lr (progress 1)."""
    return min_lr + (max_lr - min_lr) * (1.0 - progress) ** power


def cyclic_lr(done: int, total: int, cycles: int, max_lr: float, min_lr: float) -> float:
    """`cycles` linear sweeps from max_lr down toward min_lr over `total` steps, each restarting at max_lr.

    Integer arithmetic puts each sweep's first step exactly at max_lr; a float phase of
    0.9999... there would give nearly min_lr instead.
    """
    phase = (done * cycles % total) / total  # position inside the current sweep, in [0, 1)
    return max_lr - (max_lr - min_lr) * phase


def step_lr(epoch: int, max_lr: float, min_lr: float, milestones: Sequence[int], factor: float) -> float:
    """max_lr times factor once per milestone reached (epoch >= milestone), floored at min_lr."""
    passed = sum(epoch >= milestone for milestone in milestones)
    return max(max_lr * factor**passed, min_lr)


# ----------------------------------------------------------------------------- run timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """How long the run is and how it warms up: the part every schedule shares."""

    max_epochs: int
    iterations_per_epoch: int
    warmup_iterations: int = 0
    warmup_init_lr: float = 0.0
    is_iteration_based: bool = False

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ConfigError(f"scheduler.max_epochs must be at least 1, got {self.max_epochs}")
        if self.iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be at least 1, got {self.iterations_per_epoch}")
        if self.warmup_iterations < 0:
            raise ConfigError(f"scheduler.warmup_iterations must be >= 0, got {self.warmup_iterations}")
        if self.is_iteration_based and self.warmup_iterations >= self.total_iterations:
            raise ConfigError(
                f"scheduler.warmup_iterations ({self.warmup_iterations}) must be shorter than the run "
                f"({self.max_epochs} epochs x {self.iterations_per_epoch} iterations = {self.total_iterations})"
            )

    @property
    def total_iterations(self) -> int:
        return self.max_epochs * self.iterations_per_epoch

    def elapsed(self, epoch: int, iteration: int) -> Tuple[int, int]:
        """(steps done, steps in the run) on the schedule's clock after warmup."""
        if self.is_iteration_based:
            return iteration - self.warmup_iterations, self.total_iterations - self.warmup_iterations
        return epoch, self.max_epochs

    def progress(self, epoch: int, iteration: int) -> float:
        """Fraction of the run done, clamped to [0, 1]."""
        done, total = self.elapsed(epoch, iteration)
        return min(max(done / total, 0.0), 1.0)


# ----------------------------------------------------------------------------- schedulers
class Scheduler:
    """Linear warmup to peak_lr, then the subclass's ``after_warmup(epoch, iteration)``.

    ``state_keys`` names the attributes that change during training; they make up
    state_dict(), so a schedule without any (all but plateau) checkpoints as {}.
    """

    state_keys: Tuple[str, ...] = ()

    def __init__(self, timing: Timing, peak_lr: float) -> None:
        self.timing = timing
        self.peak_lr = peak_lr

    @property
    def max_epochs(self) -> int:
        return self.timing.max_epochs

    def lr(self, epoch: int, iteration: int) -> float:
        """The learning rate for the optimizer step `iteration` (global, from 0) in `epoch`."""
        t = self.timing
        if iteration < t.warmup_iterations:
            return warmup_lr(iteration, t.warmup_iterations, t.warmup_init_lr, self.peak_lr)
        return self.after_warmup(epoch, iteration)

    def after_warmup(self, epoch: int, iteration: int) -> float:
        raise NotImplementedError

    def step_epoch(self, metric: Optional[float], higher_is_better: bool = True) -> None:
        """End of an epoch with its validation metric; only plateau listens."""

    def state_dict(self) -> Dict[str, Any]:
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if set(state) != set(self.state_keys):
            raise ConfigError(
                f"{type(self).__name__} state needs keys {sorted(self.state_keys)}, got {sorted(state)}; "
                "was the checkpoint written with another scheduler?"
            )
        for key in self.state_keys:
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_range(owner: str, max_lr: float, min_lr: float) -> None:
    if not 0.0 <= min_lr <= max_lr:
        raise ConfigError(f"scheduler.{owner}: need 0 <= min_lr <= max_lr, got min_lr {min_lr}, max_lr {max_lr}")


def _check_factor(owner: str, factor: float) -> None:
    if not 0.0 < factor <= 1.0:
        raise ConfigError(f"scheduler.{owner}.factor must be in (0, 1], got {factor}")


SCHEDULERS: Registry[Type[Scheduler]] = Registry("scheduler")


@SCHEDULERS.register("cosine")
class CosineScheduler(Scheduler):
    """max_lr -> min_lr along half a cosine over the run."""

    def __init__(self, timing: Timing, max_lr: float, min_lr: float) -> None:
        _check_range("cosine", max_lr, min_lr)
        super().__init__(timing, peak_lr=max_lr)
        self.min_lr = min_lr

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return cosine_lr(self.timing.progress(epoch, iteration), self.peak_lr, self.min_lr)


@SCHEDULERS.register("cyclic")
class CyclicScheduler(Scheduler):
    """`cycles` equal linear sweeps from max_lr toward min_lr, restarting at max_lr."""

    def __init__(self, timing: Timing, max_lr: float, min_lr: float, cycles: int) -> None:
        _check_range("cyclic", max_lr, min_lr)
        if cycles < 1:
            raise ConfigError(f"scheduler.cyclic.cycles must be at least 1, got {cycles}")
        super().__init__(timing, peak_lr=max_lr)
        self.min_lr = min_lr
        self.cycles = cycles

    def after_warmup(self, epoch: int, iteration: int) -> float:
        done, total = self.timing.elapsed(epoch, iteration)
        return cyclic_lr(done, total, self.cycles, self.peak_lr, self.min_lr)


@SCHEDULERS.register("div_by_ten")
class DivByTenScheduler(Scheduler):
    """The paper's step schedule: max_lr, times factor at each milestone epoch, floored at min_lr."""

    def __init__(
        self, timing: Timing, max_lr: float, min_lr: float, milestones: Sequence[int], factor: float
    ) -> None:
        _check_range("div_by_ten", max_lr, min_lr)
        _check_factor("div_by_ten", factor)
        super().__init__(timing, peak_lr=max_lr)
        self.min_lr = min_lr
        self.milestones = tuple(milestones)
        self.factor = factor

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return step_lr(epoch, self.peak_lr, self.min_lr, self.milestones, self.factor)


@SCHEDULERS.register("plateau")
class PlateauScheduler(Scheduler):
    """The paper's text: start at max_lr; after `patience` epochs in a row without the val
    metric improving by more than `threshold`, multiply the LR by factor (floored at min_lr).

    Unlike torch's ReduceLROnPlateau (which waits patience + 1 bad epochs), the LR drops at
    the end of the patience-th bad epoch, then the count starts again.
    """

    state_keys = ("current_lr", "best", "bad_epochs")

    def __init__(
        self, timing: Timing, max_lr: float, min_lr: float, patience: int, factor: float, threshold: float
    ) -> None:
        _check_range("plateau", max_lr, min_lr)
        _check_factor("plateau", factor)
        if patience < 1:
            raise ConfigError(f"scheduler.plateau.patience must be at least 1, got {patience}")
        super().__init__(timing, peak_lr=max_lr)
        self.min_lr = min_lr
        self.patience = patience
        self.factor = factor
        self.threshold = threshold
        self.current_lr = max_lr
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return self.current_lr

    def step_epoch(self, metric: Optional[float], higher_is_better: bool = True) -> None:
        if metric is None:
            raise ValueError("the plateau scheduler needs the validation metric at the end of every epoch")
        metric = float(metric)
        if self._improves(metric, higher_is_better):
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.current_lr = max(self.current_lr * self.factor, self.min_lr)
            self.bad_epochs = 0

    def _improves(self, metric: float, higher_is_better: bool) -> bool:
        if self.best is None:
            return True
        gain = metric - self.best if higher_is_better else self.best - metric
        return gain > self.threshold  # a NaN metric never counts as progress


@SCHEDULERS.register("polynomial")
class PolynomialScheduler(Scheduler):
    """max_lr -> min_lr as (1 - progress)^power."""

    def __init__(self, timing: Timing, max_lr: float, min_lr: float, power: float) -> None:
        _check_range("polynomial", max_lr, min_lr)
        super().__init__(timing, peak_lr=max_lr)
        self.min_lr = min_lr
        self.power = power

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return polynomial_lr(self.timing.progress(epoch, iteration), self.peak_lr, self.min_lr, self.power)


@SCHEDULERS.register("fixed")
class FixedScheduler(Scheduler):
    """A constant LR (after the warmup, if any)."""

    def __init__(self, timing: Timing, lr: float) -> None:
        super().__init__(timing, peak_lr=lr)

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return self.peak_lr


# ----------------------------------------------------------------------------- builder
def build_scheduler(cfg: SchedulerConfig, iterations_per_epoch: int) -> Scheduler:
    """The scheduler named by ``cfg.name``, configured by the block named after it."""
    scheduler_cls = SCHEDULERS.get(cfg.name)
    timing = Timing(
        max_epochs=cfg.max_epochs,
        iterations_per_epoch=iterations_per_epoch,
        warmup_iterations=cfg.warmup_iterations,
        warmup_init_lr=cfg.warmup_init_lr,
        is_iteration_based=cfg.is_iteration_based,
    )
    return scheduler_cls(timing, **dataclasses.asdict(getattr(cfg, cfg.name)))
