"""Optimizers over parameter groups, and learning-rate schedules."""
from optim.optimizers import OPTIMIZERS, build_optimizer, create_optimizer
from optim.param_groups import check_param_groups, param_groups
from optim.schedulers import SCHEDULERS, Scheduler, Timing, build_scheduler

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "Scheduler",
    "Timing",
    "build_optimizer",
    "build_scheduler",
    "check_param_groups",
    "create_optimizer",
    "param_groups",
]
