"""Schedule values at chosen (epoch, iteration) points, hand-computed from the formulas."""
from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from optim import SCHEDULERS, build_scheduler
from options.registry import RegistryError
from options.schema import SchedulerConfig


def make(
    name: str,
    *,
    max_epochs: int = 100,
    iterations_per_epoch: int = 10,
    warmup_iterations: int = 0,
    warmup_init_lr: float = 0.0,
    is_iteration_based: bool = False,
    **block,
):
    """build_scheduler on a SchedulerConfig whose block `name` gets the given settings."""
    default = SchedulerConfig()
    cfg = dataclasses.replace(
        default,
        name=name,
        max_epochs=max_epochs,
        warmup_iterations=warmup_iterations,
        warmup_init_lr=warmup_init_lr,
        is_iteration_based=is_iteration_based,
        **{name: dataclasses.replace(getattr(default, name), **block)},
    )
    return build_scheduler(cfg, iterations_per_epoch)


# Every schedule with its peak set to 0.5, so its value at epoch 0 after warmup is 0.5.
PEAK_HALF = {
    "cosine": {"max_lr": 0.5, "min_lr": 0.0},
    "cyclic": {"max_lr": 0.5, "min_lr": 0.0},
    "div_by_ten": {"max_lr": 0.5, "min_lr": 0.0},
    "plateau": {"max_lr": 0.5, "min_lr": 0.0},
    "polynomial": {"max_lr": 0.5, "min_lr": 0.0},
    "fixed": {"lr": 0.5},
}


def test_every_registered_scheduler_is_covered():
    assert sorted(PEAK_HALF) == SCHEDULERS.names()


# ----------------------------------------------------------------------------- warmup
@pytest.mark.parametrize("name", sorted(PEAK_HALF))
def test_warmup_is_linear_from_init_lr_to_the_schedule_value(name):
    s = make(name, warmup_iterations=100, warmup_init_lr=0.1, iterations_per_epoch=1000, **PEAK_HALF[name])
    assert s.lr(0, 0) == pytest.approx(0.1)
    assert s.lr(0, 50) == pytest.approx(0.3)  # 0.1 + (0.5 - 0.1) * 50 / 100
    assert s.lr(0, 99) == pytest.approx(0.496)  # 0.1 + 0.4 * 99 / 100
    assert s.lr(0, 100) == pytest.approx(0.5)  # warmup over: the schedule's own value


@pytest.mark.parametrize("name", sorted(PEAK_HALF))
def test_every_scheduler_builds_from_its_defaults(name):
    s = build_scheduler(SchedulerConfig(name=name), iterations_per_epoch=50)
    assert s.max_epochs == SchedulerConfig().max_epochs
    values = [s.lr(epoch, epoch * 50) for epoch in range(s.max_epochs)]
    assert all(math.isfinite(v) and v > 0 for v in values)


def test_paper_mobilevit_recipe_warmup():
    # AdamW recipe: warmup from 2e-4 over 3000 iterations to the cosine's max_lr 2e-3.
    s = make("cosine", max_epochs=200, iterations_per_epoch=782, warmup_iterations=3000,
             warmup_init_lr=2e-4, max_lr=2e-3, min_lr=2e-4)
    assert s.lr(0, 0) == pytest.approx(2e-4)
    assert s.lr(1, 1500) == pytest.approx(1.1e-3)


# ----------------------------------------------------------------------------- cosine
def test_cosine_per_epoch():
    s = make("cosine", max_epochs=150, max_lr=0.4, min_lr=0.0002)
    assert s.lr(0, 0) == pytest.approx(0.4)
    assert s.lr(50, 500) == pytest.approx(0.30005)  # 0.0002 + 0.5 * 0.3998 * (1 + cos(pi / 3))
    assert s.lr(75, 750) == pytest.approx(0.2001)  # halfway: the mean of max and min
    assert s.lr(150, 1500) == pytest.approx(0.0002)


def test_cosine_per_epoch_ignores_the_iteration_inside_an_epoch():
    s = make("cosine", max_epochs=10, iterations_per_epoch=100, max_lr=1.0, min_lr=0.0)
    assert s.lr(3, 300) == s.lr(3, 399) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))


def test_cosine_per_iteration_decays_from_the_end_of_warmup():
    # 10 epochs x 100 iterations = 1000; 900 of them after the 100 warmup iterations.
    s = make("cosine", max_epochs=10, iterations_per_epoch=100, warmup_iterations=100,
             is_iteration_based=True, max_lr=1.0, min_lr=0.0)
    assert s.lr(1, 100) == pytest.approx(1.0)
    assert s.lr(4, 400) == pytest.approx(0.75)  # progress 1/3: 0.5 * (1 + cos(pi / 3))
    assert s.lr(5, 550) == pytest.approx(0.5)  # progress 1/2
    assert s.lr(10, 1000) == pytest.approx(0.0)
    assert s.lr(4, 401) < s.lr(4, 400)  # moves inside an epoch, unlike the epoch-based form


def test_iteration_based_needs_a_run_longer_than_warmup():
    with pytest.raises(ValueError, match="warmup_iterations .* shorter than the run"):
        make("cosine", max_epochs=2, iterations_per_epoch=10, warmup_iterations=20, is_iteration_based=True)


# ----------------------------------------------------------------------------- others
def test_polynomial():
    s = make("polynomial", max_epochs=10, max_lr=1.0, min_lr=0.1, power=2.0)
    assert s.lr(0, 0) == pytest.approx(1.0)
    assert s.lr(5, 50) == pytest.approx(0.325)  # 0.1 + 0.9 * (1 - 0.5) ** 2
    assert s.lr(10, 100) == pytest.approx(0.1)


def test_cyclic_per_epoch_sweeps_high_to_low_and_restarts():
    # 50 epochs in 5 sweeps of 10 epochs, each from 0.1 down toward 0.01.
    s = make("cyclic", max_epochs=50, max_lr=0.1, min_lr=0.01, cycles=5)
    assert s.lr(0, 0) == pytest.approx(0.1)
    assert s.lr(5, 50) == pytest.approx(0.055)  # 0.1 - 0.09 * 5 / 10
    assert s.lr(9, 90) == pytest.approx(0.019)  # 0.1 - 0.09 * 9 / 10
    assert s.lr(10, 100) == pytest.approx(0.1)
    assert s.lr(49, 490) == pytest.approx(0.019)


def test_cyclic_per_iteration():
    # 5 epochs x 20 iterations = 100 iterations in 2 sweeps of 50.
    s = make("cyclic", max_epochs=5, iterations_per_epoch=20, is_iteration_based=True,
             max_lr=0.1, min_lr=0.01, cycles=2)
    assert s.lr(1, 25) == pytest.approx(0.055)
    assert s.lr(2, 50) == pytest.approx(0.1)
    assert s.lr(4, 99) == pytest.approx(0.1 - 0.09 * 49 / 50)


def test_fixed():
    s = make("fixed", warmup_iterations=10, warmup_init_lr=0.0, lr=0.03)
    assert s.lr(0, 5) == pytest.approx(0.015)
    assert s.lr(0, 10) == s.lr(99, 10_000) == pytest.approx(0.03)


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 0.4), (39, 0.4), (40, 0.04), (59, 0.04), (60, 0.004), (79, 0.004), (80, 0.0004), (120, 0.0004)],
)
def test_div_by_ten_at_its_milestones(epoch, expected):
    s = make("div_by_ten", max_epochs=150, max_lr=0.4, min_lr=2e-4, milestones=(40, 60, 80), factor=0.1)
    assert s.lr(epoch, epoch * 10) == pytest.approx(expected)


def test_div_by_ten_floors_at_min_lr_and_counts_epochs_in_both_modes():
    for iteration_based in (False, True):
        s = make("div_by_ten", max_epochs=150, is_iteration_based=iteration_based,
                 max_lr=0.4, min_lr=1e-3, milestones=(40, 60, 80), factor=0.1)
        assert s.lr(60, 600) == pytest.approx(0.004)
        assert s.lr(80, 800) == pytest.approx(1e-3)  # 0.0004 floored
        assert s.lr(39, 399) == pytest.approx(0.4)


@pytest.mark.parametrize("name", ["cosine", "cyclic", "div_by_ten", "polynomial", "fixed"])
def test_stateless_schedulers(name):
    s = make(name, **PEAK_HALF[name])
    before = s.lr(7, 70)
    s.step_epoch(None)
    s.step_epoch(0.3, higher_is_better=False)
    assert s.lr(7, 70) == before
    assert s.state_dict() == {}
    s.load_state_dict({})
    with pytest.raises(ValueError, match="another scheduler"):
        s.load_state_dict({"current_lr": 0.1, "best": 0.5, "bad_epochs": 0})


def test_min_lr_above_max_lr_is_rejected():
    with pytest.raises(ValueError, match="scheduler.cosine: need 0 <= min_lr <= max_lr"):
        make("cosine", max_lr=0.1, min_lr=0.2)


# ----------------------------------------------------------------------------- plateau
def plateau(**block):
    settings = {"max_lr": 0.4, "min_lr": 1e-3, "patience": 3, "factor": 0.1, "threshold": 0.0, **block}
    return make("plateau", **settings)


def test_plateau_divides_after_patience_epochs_without_improvement_not_before():
    s = plateau()
    for metric in (50.0, 50.0, 49.0):  # the best, then two epochs without improvement
        s.step_epoch(metric)
    assert s.lr(3, 30) == pytest.approx(0.4)
    s.step_epoch(50.0)  # third epoch in a row: equal is no improvement
    assert s.lr(4, 40) == pytest.approx(0.04)


def test_plateau_improvement_resets_the_count():
    s = plateau()
    for metric in (10.0, 9.0, 9.0, 11.0, 10.0, 10.0):
        s.step_epoch(metric)
    assert s.lr(6, 60) == pytest.approx(0.4)


def test_plateau_threshold_and_lower_is_better():
    s = plateau(patience=1, threshold=0.5)
    s.step_epoch(2.0, higher_is_better=False)
    s.step_epoch(1.6, higher_is_better=False)  # better by 0.4, not by more than 0.5
    assert s.lr(2, 20) == pytest.approx(0.04)
    s.step_epoch(1.0, higher_is_better=False)  # better by 1.0 than the best (2.0)
    assert s.lr(3, 30) == pytest.approx(0.04)


def test_plateau_floors_at_min_lr():
    s = plateau(patience=1)
    s.step_epoch(1.0)
    lrs = []
    for _ in range(4):
        s.step_epoch(0.0)
        lrs.append(s.lr(0, 0))
    assert lrs == pytest.approx([0.04, 0.004, 1e-3, 1e-3])


def test_plateau_warms_up_to_max_lr():
    s = plateau(warmup_iterations=10, warmup_init_lr=0.0)
    assert s.lr(0, 5) == pytest.approx(0.2)


def test_plateau_needs_the_metric():
    with pytest.raises(ValueError, match="validation metric"):
        plateau().step_epoch(None)


def test_plateau_state_round_trips_through_a_checkpoint():
    s = plateau()
    for metric in (5.0, 4.0, 4.0, 4.0, 4.5):  # one division, then one bad epoch
        s.step_epoch(metric)
    buffer = io.BytesIO()
    torch.save({"scheduler": s.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["scheduler"]

    resumed = plateau()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == s.state_dict() == {"current_lr": pytest.approx(0.04), "best": 5.0, "bad_epochs": 1}
    for sched in (s, resumed):
        sched.step_epoch(4.0)
        sched.step_epoch(4.0)  # third bad epoch since the division
    assert resumed.lr(9, 90) == s.lr(9, 90) == pytest.approx(0.004)


# ----------------------------------------------------------------------------- registry
def test_unknown_scheduler_lists_the_known_ones():
    with pytest.raises(RegistryError) as info:
        build_scheduler(SchedulerConfig(name="cosin"), iterations_per_epoch=10)
    message = str(info.value)
    assert all(name in message for name in SCHEDULERS.names())
    assert "did you mean 'cosine'" in message
