"""Fitting a training run to a time budget (``boatvit train --time-budget 20m``).

A budgeted run measures itself before it starts: a few real optimizer steps and a few validation batches on its own
model, data and machine (`boatvit.training` does that, on a copy of the starting state). `plan_schedule` turns those
measurements into a whole schedule, epochs, batches per epoch and warm-up, that ends annealed (the cosine decay at its
minimum learning rate), evaluated and saved inside the budget. The plan is written into the run's config, so a
resumed run keeps it. After each epoch the run checks its plan against its clock: when the machine's load has
changed since it measured itself, the rest of the schedule is planned again for the time left (`replan_schedule`),
its cosine decay stretched or shrunk over it. The functions here are pure: times in, schedule out, so they are tested
against a fake clock.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from .errors import UsageError

__all__ = ['parse_duration', 'format_duration', 'StepTimes', 'SchedulePlan', 'plan_schedule', 'replan_schedule']

_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}
# 90s, 20m, 1.5h, 1h30m, 2h 15m: numbers each followed by a unit, largest first
_DURATION = re.compile(r'^\s*(?:(\d+(?:\.\d+)?)\s*([smhd])\s*)+$')
_PART = re.compile(r'(\d+(?:\.\d+)?)\s*([smhd])')
#: the share of a budget kept back for what the measurements cannot see (a slower epoch, the last write to disk)
SAFETY_MARGIN = 0.03
#: the share of a budget whole epochs may leave unused before the epochs are shortened to fill it
WHOLE_EPOCH_SLACK = 0.05
#: how far (a share of the budget) a run's projected end may drift from its plan before its epochs are re-planned
REPLAN_TOLERANCE = 0.04


def parse_duration(text: str, flag: str = '--time-budget') -> float:
    """Seconds in ``text``: a number with a unit, ``s``, ``m``, ``h`` or ``d`` (``90s``, ``20m``, ``1.5h``,
    ``1h30m``).

    Raises:
        UsageError: anything else (a bare number, a negative or zero duration, an unknown unit), named with ``flag``.
    """
    if not isinstance(text, str) or not _DURATION.match(text.lower()):
        raise UsageError(
            f'{flag} takes a duration such as 90s, 20m, 1.5h or 1h30m (a number and a unit s, m, h or d), got {text!r}'
        )
    units = [unit for _, unit in _PART.findall(text.lower())]
    if len(set(units)) != len(units):
        raise UsageError(f'{flag}: {text!r} names a unit twice; write e.g. 1h30m')
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text.lower()))
    if seconds <= 0:
        raise UsageError(f'{flag} must be longer than zero, got {text!r}')
    return seconds


def format_duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min 30 s``, ``45 s``: how long, for a person."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f'{hours} h {minutes:02d} min'
    return f'{minutes} min {secs:02d} s' if minutes else f'{secs} s'


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """What a run measured of itself, in seconds.

    Attributes:
        step: one training batch (forward, backward and its share of the optimizer step), data loading included.
        eval_epoch: one validation of the whole validation split (of the EMA too when the run keeps one).
        save_epoch: writing one epoch's weights, state, metrics and curves.
    """

    step: float
    eval_epoch: float
    save_epoch: float


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    """A schedule that fits a budget.

    Attributes:
        epochs: epochs to train, each followed by a validation and a save.
        batches_per_epoch: training batches in each epoch (fewer than the split has when the budget asks for it).
        warmup_epochs: epochs of linear warm-up; the cosine decay takes the rest and ends at the minimum lr.
        seconds: the planned time of the whole run, measurements and set-up included.
    """

    epochs: int
    batches_per_epoch: int
    warmup_epochs: float
    seconds: float


def plan_schedule(
    budget: float,
    spent: float,
    times: StepTimes,
    batches_per_epoch: int,
    warmup_fraction: float,
    grad_accum: int = 1,
) -> SchedulePlan:
    """The longest schedule that ends, validated and saved, within ``budget`` seconds.

    Whole passes over the split when they leave at most 5 % of the budget unused; otherwise ``E = ceil(available /
    full epoch)`` epochs, each with the batches that fill ``available / E`` seconds, so the budget is used, not just
    its whole number of full epochs (2.9 full epochs' time gives 3 epochs of 97 % of the batches, not 2). The
    warm-up keeps ``warmup_fraction`` of the schedule (the recipe's warm-up epochs over its epochs).

    Args:
        budget: the whole run's time, seconds.
        spent: seconds already gone (opening the data, building the model, the measurements).
        times: the run's measured step, validation and save times.
        batches_per_epoch: training batches in one pass over the split.
        warmup_fraction: the share of the schedule spent warming up, in [0, 1).
        grad_accum: batches per optimizer step; an epoch keeps a whole number of steps.

    Raises:
        UsageError: the budget does not leave time for one optimizer step, one validation and one save.
    """
    if not (budget > 0 and spent >= 0 and batches_per_epoch >= 1 and grad_accum >= 1 and 0 <= warmup_fraction < 1):
        raise ValueError(
            f'plan_schedule needs budget > 0, spent >= 0, batches_per_epoch and grad_accum >= 1 and warmup_fraction in'
            f' [0, 1); got {budget}, {spent}, {batches_per_epoch}, {grad_accum}, {warmup_fraction}'
        )
    if not min(times.step, times.eval_epoch, times.save_epoch) >= 0 or times.step == 0:
        raise ValueError(f'plan_schedule needs a positive step time and non-negative others, got {times}')
    available = (budget - spent) * (1 - SAFETY_MARGIN)
    per_epoch_fixed = times.eval_epoch + times.save_epoch
    full_epoch = batches_per_epoch * times.step + per_epoch_fixed
    needed = grad_accum * times.step + per_epoch_fixed
    if available < needed:
        raise UsageError(
            f'a time budget of {format_duration(budget)} is too short for this run: {format_duration(spent)} went to'
            f' setting it up and measuring it, and one optimizer step, validation and save take'
            f' {format_duration(needed)} more; give a budget of at least {format_duration(spent + needed * 1.1 + 1)},'
            ' or a smaller model or --batch-size'
        )
    whole = int(available // full_epoch)
    if whole >= 1 and available - whole * full_epoch <= WHOLE_EPOCH_SLACK * available:
        return SchedulePlan(whole, batches_per_epoch, warmup_fraction * whole, spent + whole * full_epoch)
    epochs = max(1, math.ceil(available / full_epoch))
    while True:
        batches = min(batches_per_epoch, int((available / epochs - per_epoch_fixed) / times.step))
        batches -= batches % grad_accum
        if batches >= grad_accum or epochs == 1:
            break
        epochs -= 1  # epochs so short that the validations would take the budget: fewer, longer ones
    batches = max(batches, grad_accum)
    seconds = spent + epochs * (batches * times.step + per_epoch_fixed)
    return SchedulePlan(epochs, batches, warmup_fraction * epochs, seconds)


def replan_schedule(
    budget: float,
    elapsed: float,
    times: StepTimes,
    epochs_done: int,
    epochs: int,
    batches_per_epoch: int,
    full_epoch_batches: int,
    grad_accum: int = 1,
) -> Optional[SchedulePlan]:
    """The rest of a budgeted run's schedule, re-planned, or None while its plan holds.

    After ``epochs_done`` of its ``epochs`` (of ``batches_per_epoch`` batches each), with ``elapsed`` seconds of its
    ``budget`` gone and ``times`` measured on its last epoch: the plan holds while the end it projects stays within
    ``REPLAN_TOLERANCE`` of the budget's usable part (the budget less ``SAFETY_MARGIN``). Past that, the remaining
    time gets a schedule of its own (`plan_schedule`: its epochs, and the batches of each, up to
    ``full_epoch_batches``); the returned plan's ``epochs`` and ``seconds`` are the remaining ones. A run with no
    time left for even one more step, validation and save still gets one more epoch of one optimizer step, so that it
    ends annealed, late by that. A finished run stays finished: its schedule has annealed.
    """
    if not (
        budget > 0
        and elapsed >= 0
        and 0 <= epochs_done
        and epochs >= 1
        and 1 <= batches_per_epoch <= full_epoch_batches
        and grad_accum >= 1
        and times.step > 0
    ):
        raise ValueError(
            f'replan_schedule needs budget > 0, elapsed and epochs_done >= 0, epochs >= 1, 1 <= batches_per_epoch <='
            f' full_epoch_batches, grad_accum >= 1 and a positive step time; got {budget}, {elapsed}, {epochs_done},'
            f' {epochs}, {batches_per_epoch}, {full_epoch_batches}, {grad_accum}, {times}'
        )
    if epochs_done >= epochs:
        return None
    usable = budget * (1 - SAFETY_MARGIN)
    epoch_s = batches_per_epoch * times.step + times.eval_epoch + times.save_epoch
    if abs(elapsed + (epochs - epochs_done) * epoch_s - usable) <= REPLAN_TOLERANCE * budget:
        return None
    try:
        plan = plan_schedule(budget, elapsed, times, full_epoch_batches, 0.0, grad_accum)
    except UsageError:  # not even one more step fits
        last = grad_accum * times.step + times.eval_epoch + times.save_epoch
        return SchedulePlan(1, grad_accum, 0.0, last)
    return dataclasses.replace(plan, seconds=plan.seconds - elapsed)
