"""Schedule values at chosen (epoch, iteration) points, hand-computed from the formulas."""
from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from optim import SCHEDULERS, Timing, build_scheduler, check_config
from options.config import load_config, override
from options.registry import RegistryError
from options.schema import SchedulerConfig


def make(
    name: str,
    *,
    max_epochs: int = 100,
    total_iterations: int = 1000,
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
    return build_scheduler(cfg, total_iterations)


# Every schedule with its warmup target set to 0.5, so its value at epoch 0 after warmup is 0.5
# (cyclic warms up to its min_lr, which is also its epoch-0 value).
PEAK_HALF = {
    "cosine": {"max_lr": 0.5, "min_lr": 0.0},
    "cyclic": {"min_lr": 0.5, "last_cycle_end_lr": 0.0},
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
    s = make(name, warmup_iterations=100, warmup_init_lr=0.1, total_iterations=100_000, **PEAK_HALF[name])
    assert s.lr(0, 0) == pytest.approx(0.1)
    assert s.lr(0, 50) == pytest.approx(0.3)  # 0.1 + (0.5 - 0.1) * 50 / 100
    assert s.lr(0, 99) == pytest.approx(0.496)  # 0.1 + 0.4 * 99 / 100
    assert s.lr(0, 100) == pytest.approx(0.5)  # warmup over: the schedule's own value


@pytest.mark.parametrize("name", sorted(PEAK_HALF))
def test_every_scheduler_builds_from_its_defaults(name):
    s = build_scheduler(SchedulerConfig(name=name), total_iterations=50 * SchedulerConfig().max_epochs)
    assert s.timing.max_epochs == SchedulerConfig().max_epochs
    values = [s.lr(epoch, epoch * 50) for epoch in range(s.timing.max_epochs)]
    assert all(math.isfinite(v) and v > 0 for v in values)


def test_paper_mobilevit_recipe_warmup():
    # AdamW recipe: warmup from 2e-4 over 3000 iterations to the cosine's max_lr 2e-3.
    s = make("cosine", max_epochs=200, total_iterations=200 * 782, warmup_iterations=3000,
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
    s = make("cosine", max_epochs=10, total_iterations=1000, max_lr=1.0, min_lr=0.0)
    assert s.lr(3, 300) == s.lr(3, 399) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))


def test_cosine_per_iteration_decays_from_the_end_of_warmup_to_the_last_step():
    # 901 steps: 100 of warmup, then 800 steps from the peak (step 100) to the last one (step 900).
    s = make("cosine", max_epochs=10, total_iterations=901, warmup_iterations=100,
             is_iteration_based=True, max_lr=1.0, min_lr=0.1)
    assert s.lr(1, 100) == pytest.approx(1.0)
    assert s.lr(3, 300) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # progress 1/4
    assert s.lr(5, 500) == pytest.approx(0.55)  # progress 1/2
    assert s.lr(9, 900) == pytest.approx(0.1)  # the last step of the run is min_lr
    assert s.lr(9, 899) > 0.1
    assert s.lr(4, 401) < s.lr(4, 400)  # moves inside an epoch, unlike the epoch-based form


@pytest.mark.parametrize("name, block", [("cosine", {"max_lr": 0.4, "min_lr": 2e-4}),
                                         ("polynomial", {"max_lr": 0.4, "min_lr": 2e-4, "power": 2.0})])
def test_iteration_based_reaches_min_lr_on_the_last_step_of_variable_length_epochs(name, block):
    # The variable batch sampler gives every epoch its own length; the engine passes
    # their sum, and the final value lands on the last step of the last epoch, not after it.
    epoch_lengths = [960, 945, 952, 961]
    total = sum(epoch_lengths)
    s = make(name, max_epochs=4, total_iterations=total, warmup_iterations=300, warmup_init_lr=0.05,
             is_iteration_based=True, **block)
    assert s.lr(3, total - 1) == pytest.approx(2e-4)
    assert s.lr(3, total - 2) > 2e-4
    assert s.lr(0, 300) == pytest.approx(0.4)


def test_a_single_step_after_warmup_is_the_last_one():
    s = make("cosine", max_epochs=1, total_iterations=11, warmup_iterations=10, is_iteration_based=True,
             max_lr=1.0, min_lr=0.25)
    assert s.lr(0, 10) == pytest.approx(0.25)


def test_iteration_based_needs_a_run_longer_than_warmup():
    with pytest.raises(ValueError, match=r"^scheduler.warmup_iterations \(20\) must be shorter than the run \(20"):
        make("cosine", max_epochs=2, total_iterations=20, warmup_iterations=20, is_iteration_based=True)
    make("cosine", max_epochs=2, total_iterations=20, warmup_iterations=20)  # epoch-based: no constraint


def test_the_run_has_at_least_one_step():
    with pytest.raises(ValueError, match="total_iterations .* at least 1"):
        Timing(max_epochs=1, total_iterations=0)


# ----------------------------------------------------------------------------- others
def test_polynomial():
    s = make("polynomial", max_epochs=10, max_lr=1.0, min_lr=0.1, power=2.0)
    assert s.lr(0, 0) == pytest.approx(1.0)
    assert s.lr(5, 50) == pytest.approx(0.325)  # 0.1 + 0.9 * (1 - 0.5) ** 2
    assert s.lr(10, 100) == pytest.approx(0.1)


# The authors' cyclic run (Table 4's extra row): results/AU_results_resnet_tiny_correct_class_depth18_cyclic.txt
# on branch au-3070 of footh/ml-cvnets, ResNet-18, 782 batches per epoch. Each tuple is (epoch, optimizer
# step, LR) as that log prints them (rounded to 6 decimals): warmup from 0.05 to min_lr 0.1 over 7500
# steps, the cycles 0.1, 0.5, 0.4, 0.3, 0.2 through epoch 50, then linear down to 0.0002 at epoch 149.
LOGGED_CYCLIC_LRS = [
    (0, 0, 0.05), (0, 500, 0.053333), (1, 782, 0.055213), (1, 1282, 0.058547), (2, 2064, 0.06376),
    (4, 3628, 0.074187), (6, 5192, 0.084613), (8, 6756, 0.09504), (9, 7038, 0.09692), (9, 7538, 0.2),
    (10, 7820, 0.1), (11, 8602, 0.5), (12, 9384, 0.4), (13, 10166, 0.3), (14, 10948, 0.2),
    (15, 11730, 0.1), (16, 12512, 0.5), (47, 36754, 0.4), (48, 37536, 0.3), (49, 38318, 0.2),
    (50, 39100, 0.1), (50, 39600, 0.1), (51, 39882, 0.098004), (52, 40664, 0.097006),
    (53, 41446, 0.096008), (99, 77418, 0.0501), (100, 78200, 0.049102), (120, 93840, 0.029142),
    (148, 115736, 0.001198), (149, 116518, 0.0002), (149, 117018, 0.0002),
]


def authors_cyclic(**changes):
    settings = dict(max_epochs=150, total_iterations=150 * 782, warmup_iterations=7500, warmup_init_lr=0.05,
                    min_lr=0.1, epochs_per_cycle=5, total_cycles=11, last_cycle_end_lr=0.0002,
                    last_cycle_type="linear")
    settings.update(changes)
    return make("cyclic", **settings)


@pytest.mark.parametrize("epoch, iteration, logged", LOGGED_CYCLIC_LRS)
def test_cyclic_matches_the_authors_log(epoch, iteration, logged):
    assert authors_cyclic().lr(epoch, iteration) == pytest.approx(logged, abs=1e-6)


def test_cyclic_counts_epochs_in_both_clock_modes():
    per_epoch, per_iteration = authors_cyclic(), authors_cyclic(is_iteration_based=True)
    assert [per_iteration.lr(e, e * 782) for e in range(150)] == [per_epoch.lr(e, e * 782) for e in range(150)]


def test_cyclic_cosine_last_cycle_ends_at_last_cycle_end_lr():
    # 2 repeated cycles of 4 epochs (0.1, 0.4, 0.3, 0.2), epoch 8 starts a cycle, epochs 9..11 fall.
    s = make("cyclic", max_epochs=12, min_lr=0.1, epochs_per_cycle=4, total_cycles=3, last_cycle_end_lr=0.01,
             last_cycle_type="cosine")
    assert [s.lr(e, 0) for e in range(9)] == pytest.approx([0.1, 0.4, 0.3, 0.2, 0.1, 0.4, 0.3, 0.2, 0.1])
    # The last cycle has 4 epochs (8..11); epoch e is (e - 8 + 1) / 4 of the way down the cosine.
    assert s.lr(9, 0) == pytest.approx(0.01 + 0.045 * (1 + math.cos(math.pi / 2)))
    assert s.lr(11, 0) == pytest.approx(0.01)


def test_cyclic_needs_epochs_for_its_last_cycle():
    with pytest.raises(ValueError, match=r"^scheduler.cyclic.total_cycles: 10 repeated cycles of 5 epochs .*"
                                         r"need max_epochs > 50"):
        make("cyclic", max_epochs=50, min_lr=0.1, epochs_per_cycle=5, total_cycles=11)
    make("cyclic", max_epochs=51, min_lr=0.1, epochs_per_cycle=5, total_cycles=11)


def test_fixed():
    s = make("fixed", warmup_iterations=10, warmup_init_lr=0.0, lr=0.03)
    assert s.lr(0, 5) == pytest.approx(0.015)
    assert s.lr(0, 10) == s.lr(99, 10_000) == pytest.approx(0.03)


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 0.4), (39, 0.4), (40, 0.04), (79, 0.04), (80, 0.004), (119, 0.004), (120, 0.0004), (149, 0.0004)],
)
def test_div_by_ten_at_the_papers_milestones_by_default(epoch, expected):
    # Every config and log of the authors steps at epochs 40, 80 and 120 (the schema's default).
    s = make("div_by_ten", max_epochs=150, max_lr=0.4, min_lr=2e-4)
    assert s.milestones == (40, 80, 120)
    assert s.lr(epoch, epoch * 10) == pytest.approx(expected)


def test_div_by_ten_floors_at_min_lr_and_counts_epochs_in_both_modes():
    for iteration_based in (False, True):
        s = make("div_by_ten", max_epochs=150, total_iterations=1500, is_iteration_based=iteration_based,
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


# ----------------------------------------------------------------------------- check_config
def test_check_config_passes_the_defaults_and_rejects_a_cyclic_run_too_short():
    cfg = load_config([])
    check_config(cfg)
    with pytest.raises(ValueError, match=r"^scheduler.cyclic.total_cycles:"):
        check_config(override(cfg, {"scheduler.name": "cyclic", "scheduler.max_epochs": 40}))


def test_check_config_leaves_the_warmup_against_the_run_length_to_the_engine():
    # Only the engine knows the run's optimizer steps; check_config must not guess them.
    cfg = override(load_config([]), {"scheduler.is_iteration_based": True, "scheduler.warmup_iterations": 10**7})
    check_config(cfg)
    with pytest.raises(ValueError, match="shorter than the run"):
        build_scheduler(cfg.scheduler, total_iterations=200 * 782)


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


def test_plateau_a_nan_metric_never_counts_as_progress():
    s = plateau(patience=2)
    s.step_epoch(float("nan"))  # not a best either: no later metric could improve on it
    for metric in (1.0, 2.0, 3.0):
        s.step_epoch(metric)
    assert s.lr(4, 40) == pytest.approx(0.4)


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
        build_scheduler(SchedulerConfig(name="cosin"), total_iterations=10)
    message = str(info.value)
    assert all(name in message for name in SCHEDULERS.names())
    assert "did you mean 'cosine'" in message
