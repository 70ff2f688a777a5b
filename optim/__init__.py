"""Optimizers over parameter groups, learning-rate schedules, and their config checks."""
from optim.optimizers import OPTIMIZERS, build_optimizer, create_optimizer
from optim.param_groups import check_param_groups, param_groups
from optim.schedulers import SCHEDULERS, Scheduler, Timing, build_scheduler, check_config

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "Scheduler",
    "Timing",
    "build_optimizer",
    "build_scheduler",
    "check_config",
    "check_param_groups",
    "create_optimizer",
    "param_groups",
]
