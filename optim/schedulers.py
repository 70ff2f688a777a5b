"""Learning-rate schedules as functions of (epoch, iteration), looked up in SCHEDULERS.

``iteration`` is the global optimizer-step count from 0; ``epoch`` counts from 0.

Warmup (shared by all, ml-cvnets semantics): while iteration < warmup_iterations,
    lr = warmup_init_lr + (target - warmup_init_lr) * iteration / warmup_iterations
where target is the schedule's max_lr (``fixed``: its lr; ``cyclic``: its min_lr, as in the
paper's code). Iteration 0 therefore gives warmup_init_lr and iteration warmup_iterations the
schedule's own value.

After warmup, cosine and polynomial read their progress through the run:
- epoch-based (default): progress = epoch / max_epochs. As in ml-cvnets, the epochs spent
  in warmup count as part of the run, so the LR may step down when warmup ends, and the last
  epoch runs one step above min_lr.
- iteration-based: progress = (iteration - W) / (T - 1 - W) with W = warmup_iterations and
  T = the run's total optimizer steps (the engine counts them from the sampler's epoch
  lengths), so the decay starts from the peak where warmup ends and reaches min_lr on the
  last step of the last epoch.
div_by_ten and cyclic count epochs in both modes (they only change at epoch boundaries);
fixed and plateau have no notion of progress.

Settings are validated where the config is built (options/schema.py: ranges, min_lr <= max_lr,
...). The classes here check only what needs the run itself, raising ValueError with the
config key first (``optim.check_config`` runs those checks on a loaded config).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Type

from options.registry import Registry
from options.schema import Config, SchedulerConfig


# ----------------------------------------------------------------------------- pure formulas
def warmup_lr(iteration: int, warmup_iterations: int, warmup_init_lr: float, target_lr: float) -> float:
    """Linear ramp from warmup_init_lr (iteration 0) toward target_lr (iteration warmup_iterations)."""
    return warmup_init_lr + (target_lr - warmup_init_lr) * iteration / warmup_iterations


def cosine_lr(progress: float, max_lr: float, min_lr: float) -> float:
    """Half a cosine from max_lr (progress 0) to min_lr (progress 1)."""
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def polynomial_lr(progress: float, max_lr: float, min_lr: float, power: float) -> float:
    """max_lr (progress 0) decaying as (1 - progress)^power to min_lr (progress 1)."""
    return min_lr + (max_lr - min_lr) * (1.0 - progress) ** power


def cyclic_lr(
    epoch: int, min_lr: float, epochs_per_cycle: int, total_cycles: int, max_epochs: int,
    last_cycle_end_lr: float, last_cycle_type: str,
) -> float:
    """The paper's cyclic schedule (its fork's optim/scheduler/cyclic.py), per epoch.

    The first total_cycles - 1 cycles repeat by epoch % epochs_per_cycle: one epoch at min_lr,
    then peak = min_lr * epochs_per_cycle falling linearly toward min_lr (5 epochs of 0.1:
    0.1, 0.5, 0.4, 0.3, 0.2). Epoch C = epochs_per_cycle * (total_cycles - 1) still starts a
    cycle (min_lr). The remaining L = max_epochs - C epochs form the last cycle, which falls
    from min_lr so that epoch max_epochs - 1 is exactly last_cycle_end_lr: the fraction done
    at epoch e is (e - C + 1) / L, linearly (the fork's) or along half a cosine (the fork's
    cosine never reaches last_cycle_end_lr; no run of the authors used it).
    """
    cyclic_epochs = epochs_per_cycle * (total_cycles - 1)
    if epoch <= cyclic_epochs:
        phase = epoch % epochs_per_cycle
        if phase == 0:
            return min_lr
        peak = min_lr * epochs_per_cycle
        return peak - (peak - min_lr) * (phase - 1) / (epochs_per_cycle - 1)
    done = min((epoch - cyclic_epochs + 1) / (max_epochs - cyclic_epochs), 1.0)
    if last_cycle_type == "linear":
        return min_lr - (min_lr - last_cycle_end_lr) * done
    return cosine_lr(done, min_lr, last_cycle_end_lr)


def step_lr(epoch: int, max_lr: float, min_lr: float, milestones: Sequence[int], factor: float) -> float:
    """max_lr times factor once per milestone reached (epoch >= milestone), floored at min_lr."""
    passed = sum(epoch >= milestone for milestone in milestones)
    return max(max_lr * factor**passed, min_lr)


# ----------------------------------------------------------------------------- run timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """How long the run is and how it warms up: the part every schedule shares.

    total_iterations is the exact number of optimizer steps of the whole run (with the
    variable batch sampler every epoch has its own length; the engine adds them up).
    """

    max_epochs: int
    total_iterations: int
    warmup_iterations: int = 0
    warmup_init_lr: float = 0.0
    is_iteration_based: bool = False

    def __post_init__(self) -> None:
        if self.total_iterations < 1:
            raise ValueError(f"total_iterations (optimizer steps of the run) must be at least 1, "
                             f"got {self.total_iterations}")
        if self.is_iteration_based and self.warmup_iterations >= self.total_iterations:
            raise ValueError(
                f"scheduler.warmup_iterations ({self.warmup_iterations}) must be shorter than the run "
                f"({self.total_iterations} optimizer steps) when scheduler.is_iteration_based is true"
            )

    def progress(self, epoch: int, iteration: int) -> float:
        """Fraction of the run done after warmup, clamped to [0, 1]."""
        if self.is_iteration_based:
            # The last step (total_iterations - 1) is the end of the decay.
            done, span = iteration - self.warmup_iterations, self.total_iterations - 1 - self.warmup_iterations
        else:
            done, span = epoch, self.max_epochs
        if span <= 0:  # a single step after warmup: it is the last one
            return 1.0
        return min(max(done / span, 0.0), 1.0)


# ----------------------------------------------------------------------------- schedulers
class Scheduler:
    """Linear warmup to warmup_target, then the subclass's ``after_warmup(epoch, iteration)``.

    ``state_keys`` names the attributes that change during training; they make up
    state_dict(), so a schedule without any (all but plateau) checkpoints as {}.
    """

    state_keys: Tuple[str, ...] = ()

    def __init__(self, timing: Timing, warmup_target: float) -> None:
        self.timing = timing
        self.warmup_target = warmup_target

    def lr(self, epoch: int, iteration: int) -> float:
        """The learning rate for the optimizer step `iteration` (global, from 0) in `epoch`."""
        t = self.timing
        if iteration < t.warmup_iterations:
            return warmup_lr(iteration, t.warmup_iterations, t.warmup_init_lr, self.warmup_target)
        return self.after_warmup(epoch, iteration)

    def after_warmup(self, epoch: int, iteration: int) -> float:
        raise NotImplementedError

    def step_epoch(self, metric: Optional[float], higher_is_better: bool = True) -> None:
        """End of an epoch with its validation metric; only plateau listens."""

    def state_dict(self) -> Dict[str, Any]:
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if set(state) != set(self.state_keys):
            raise ValueError(
                f"{type(self).__name__} state needs keys {sorted(self.state_keys)}, got {sorted(state)}; "
                "was the checkpoint written with another scheduler?"
            )
        for key in self.state_keys:
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


SCHEDULERS: Registry[Type[Scheduler]] = Registry("scheduler", config_key="scheduler.name")


@SCHEDULERS.register("cosine")
class CosineScheduler(Scheduler):
    """max_lr -> min_lr along half a cosine over the run."""

    def __init__(self, timing: Timing, max_lr: float, min_lr: float) -> None:
        super().__init__(timing, warmup_target=max_lr)
        self.max_lr, self.min_lr = max_lr, min_lr

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return cosine_lr(self.timing.progress(epoch, iteration), self.max_lr, self.min_lr)


@SCHEDULERS.register("cyclic")
class CyclicScheduler(Scheduler):
    """The paper's cyclic schedule (see cyclic_lr): repeated 1-epoch-low, peak-then-falling
    cycles, then one last cycle falling to last_cycle_end_lr. The warmup ramps to min_lr."""

    def __init__(
        self, timing: Timing, min_lr: float, epochs_per_cycle: int, total_cycles: int,
        last_cycle_end_lr: float, last_cycle_type: str,
    ) -> None:
        repeated = epochs_per_cycle * (total_cycles - 1)
        if repeated >= timing.max_epochs:
            raise ValueError(
                f"scheduler.cyclic.total_cycles: {total_cycles - 1} repeated cycles of {epochs_per_cycle} epochs "
                f"leave no epoch of scheduler.max_epochs ({timing.max_epochs}) for the last cycle; "
                f"need max_epochs > {repeated}"
            )
        super().__init__(timing, warmup_target=min_lr)
        self.min_lr = min_lr
        self.epochs_per_cycle = epochs_per_cycle
        self.total_cycles = total_cycles
        self.last_cycle_end_lr = last_cycle_end_lr
        self.last_cycle_type = last_cycle_type

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return cyclic_lr(epoch, self.min_lr, self.epochs_per_cycle, self.total_cycles, self.timing.max_epochs,
                         self.last_cycle_end_lr, self.last_cycle_type)


@SCHEDULERS.register("div_by_ten")
class DivByTenScheduler(Scheduler):
    """The paper's step schedule: max_lr, times factor at each milestone epoch, floored at min_lr."""

    def __init__(
        self, timing: Timing, max_lr: float, min_lr: float, milestones: Sequence[int], factor: float
    ) -> None:
        super().__init__(timing, warmup_target=max_lr)
        self.max_lr, self.min_lr = max_lr, min_lr
        self.milestones = tuple(milestones)
        self.factor = factor

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return step_lr(epoch, self.max_lr, self.min_lr, self.milestones, self.factor)


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
        super().__init__(timing, warmup_target=max_lr)
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
        if math.isnan(metric):  # never progress, nor a best: nothing would compare as better than it
            return False
        if self.best is None:
            return True
        gain = metric - self.best if higher_is_better else self.best - metric
        return gain > self.threshold


@SCHEDULERS.register("polynomial")
class PolynomialScheduler(Scheduler):
    """max_lr -> min_lr as (1 - progress)^power."""

    def __init__(self, timing: Timing, max_lr: float, min_lr: float, power: float) -> None:
        super().__init__(timing, warmup_target=max_lr)
        self.max_lr, self.min_lr = max_lr, min_lr
        self.power = power

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return polynomial_lr(self.timing.progress(epoch, iteration), self.max_lr, self.min_lr, self.power)


@SCHEDULERS.register("fixed")
class FixedScheduler(Scheduler):
    """A constant LR (after the warmup, if any)."""

    def __init__(self, timing: Timing, lr: float) -> None:
        super().__init__(timing, warmup_target=lr)
        self.fixed_lr = lr

    def after_warmup(self, epoch: int, iteration: int) -> float:
        return self.fixed_lr


# ----------------------------------------------------------------------------- builder
def build_scheduler(cfg: SchedulerConfig, total_iterations: int) -> Scheduler:
    """The scheduler named by ``cfg.name``, configured by the block named after it.

    total_iterations: the optimizer steps of the whole run (the engine counts them from the
    sampler's per-epoch lengths and the gradient accumulation).
    """
    scheduler_cls = SCHEDULERS.get(cfg.name)
    timing = Timing(
        max_epochs=cfg.max_epochs,
        total_iterations=total_iterations,
        warmup_iterations=cfg.warmup_iterations,
        warmup_init_lr=cfg.warmup_init_lr,
        is_iteration_based=cfg.is_iteration_based,
    )
    return scheduler_cls(timing, **dataclasses.asdict(getattr(cfg, cfg.name)))


def check_config(cfg: Config) -> None:
    """Raise ValueError, its message starting with the config key, for schedule settings that
    cannot work together (e.g. more repeated cyclic epochs than the run has).

    The schedule is built as if the run were just longer than its warmup: whether an
    iteration-based warmup fits the real run needs its length in optimizer steps, which
    build_scheduler checks when the engine builds the schedule.
    """
    build_scheduler(cfg.scheduler, total_iterations=cfg.scheduler.warmup_iterations + 1)
