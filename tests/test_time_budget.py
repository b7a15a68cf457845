"""`boatvit train --time-budget`: parsing durations, the schedule that fits a budget (against made-up times), and a
budgeted run end to end with its measurements replaced by fixed times (a fake clock), resumed with the same plan,
and re-planned when its epochs take longer or shorter than it measured."""

from __future__ import annotations

import dataclasses
import json

import pytest

import boatvit.training as train_mod
from boatvit.cli import main
from boatvit.errors import UsageError
from boatvit.time_budget import (
    REPLAN_TOLERANCE,
    SAFETY_MARGIN,
    StepTimes,
    format_duration,
    parse_duration,
    plan_schedule,
    replan_schedule,
)
from test_data import make_image_folder
from test_evaluate import TINY_FLAGS


@pytest.mark.parametrize(
    'text, seconds',
    [('90s', 90), ('20m', 1200), ('1.5h', 5400), ('1h30m', 5400), ('2h 15m', 8100), ('1d', 86400), ('20M', 1200)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize('text', ['0', '0m', '-5m', 'abc', '', '20', '5x', '1h1h', 'm', '1.h'])
def test_bad_durations_are_refused_by_name(text):
    with pytest.raises(UsageError, match='--time-budget'):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (45, 750, 3900)] == ['45 s', '12 min 30 s', '1 h 05 min']


# CIFAR-10 on two cores: 390 batches of 128 at 0.25 s, 7 s a validation, 1 s a save
CIFAR = StepTimes(step=0.25, eval_epoch=7.0, save_epoch=1.0)


def planned_seconds(plan, spent, times):
    return spent + plan.epochs * (plan.batches_per_epoch * times.step + times.eval_epoch + times.save_epoch)


@pytest.mark.parametrize('budget', [60.0, 300.0, 1200.0, 3600.0, 7200.0])
def test_the_schedule_fills_the_budget_and_ends_inside_it(budget):
    spent = 20.0
    plan = plan_schedule(budget, spent, CIFAR, batches_per_epoch=390, warmup_fraction=0.05)
    seconds = planned_seconds(plan, spent, CIFAR)
    assert plan.seconds == pytest.approx(seconds)
    # inside the budget with the safety margin, and using all but a few percent of it
    assert seconds <= budget - SAFETY_MARGIN * (budget - spent) + 1e-9
    assert seconds >= budget * 0.9
    assert 1 <= plan.batches_per_epoch <= 390
    assert plan.warmup_epochs == pytest.approx(0.05 * plan.epochs)


def test_epochs_grow_with_the_budget_and_full_epochs_are_kept_when_they_fit():
    plans = [plan_schedule(b, 20.0, CIFAR, 390, 0.1) for b in (600.0, 1200.0, 2400.0)]
    assert [p.epochs for p in plans] == sorted(p.epochs for p in plans) and plans[0].epochs < plans[-1].epochs
    # 20 minutes: (1200 - 20) * 0.97 / (390 * 0.25 + 8) = 10.8 epochs, so 11 epochs of nearly every batch
    assert plans[1].epochs == 11 and 370 <= plans[1].batches_per_epoch < 390
    roomy = plan_schedule(1e6, 0.0, CIFAR, 390, 0.1)
    assert roomy.batches_per_epoch == 390


def test_a_budget_shorter_than_an_epoch_trains_part_of_one():
    plan = plan_schedule(60.0, 10.0, CIFAR, 390, 0.2)
    assert plan.epochs == 1 and plan.batches_per_epoch < 390 and plan.warmup_epochs == pytest.approx(0.2)


def test_validation_heavy_runs_get_fewer_longer_epochs_and_whole_optimizer_steps():
    slow_eval = StepTimes(step=0.1, eval_epoch=30.0, save_epoch=1.0)
    plan = plan_schedule(200.0, 0.0, slow_eval, 1000, 0.0, grad_accum=4)
    assert plan.batches_per_epoch % 4 == 0 and plan.batches_per_epoch >= 4
    assert planned_seconds(plan, 0.0, slow_eval) <= 200.0


def test_a_budget_too_short_for_one_step_is_refused_with_the_minimum():
    with pytest.raises(UsageError, match=r'too short for this run: .*give a budget of at least'):
        plan_schedule(30.0, 25.0, CIFAR, 390, 0.1)


@pytest.mark.parametrize('budget', ['0', '-5m', 'abc'])
def test_bad_budgets_are_refused_before_a_run_directory_exists(tmp_path, capsys, budget):
    assert main(['train', f'--time-budget={budget}', '--output', str(tmp_path / 'runs'), '--quiet']) == 2
    err = capsys.readouterr().err
    assert '--time-budget takes a duration such as 90s, 20m' in err and repr(budget) in err and 'Traceback' not in err
    assert not (tmp_path / 'runs').exists()


def test_a_negative_budget_after_a_space_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(['train', '--time-budget', '-5m', '--output', str(tmp_path / 'runs')])
    assert exit.value.code == 2 and 'argument --time-budget: expected one argument' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


def test_a_budget_chooses_the_epochs_so_epochs_are_refused_beside_it(tmp_path, capsys):
    assert main(['train', '--time-budget', '5m', '--epochs', '3', '--output', str(tmp_path / 'runs')]) == 2
    assert 'drop --epochs or the budget' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


FAKE = StepTimes(step=8.0, eval_epoch=3.0, save_epoch=1.0)


def interrupt_after_two_epochs(monkeypatch):
    """The next run stops with Ctrl-C once its second epoch is saved (exit 130); later runs are not stopped."""
    real_save = train_mod._save_epoch
    interrupted = []

    def stop_after_two(run_dir, trainer, history, *rest):
        real_save(run_dir, trainer, history, *rest)
        if len(history) == 2 and not interrupted:
            interrupted.append(2)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, '_save_epoch', stop_after_two)


def test_a_budgeted_run_trains_the_planned_schedule_ends_annealed_and_resumes_with_it(tmp_path, capsys, monkeypatch):
    """The measurements replaced by fixed times: 8 batches an epoch at 8 s, so 3 minutes plan 3 epochs of 8 or
    fewer batches; the run trains that schedule, its lr ends at the minimum, and a resume does not plan again."""
    data = make_image_folder(tmp_path / 'data', {'train': {'a': 16, 'b': 16}, 'val': {'a': 2, 'b': 2}})
    measured = []

    def fake_measure(*args):
        measured.append(args)
        return FAKE

    monkeypatch.setattr(train_mod, '_measure_run', fake_measure)
    # the epochs take milliseconds, not the fake minute: the plan is held to (re-planning: the test below)
    monkeypatch.setattr(train_mod, 'replan_schedule', lambda *args: None)
    out = tmp_path / 'runs'
    argv = ['train', '--data', str(data), *TINY_FLAGS, '--batch-size', '4', '--workers', '0', '--quiet']
    interrupt_after_two_epochs(monkeypatch)
    assert main([*argv, '--time-budget', '3m', '--min-lr', '1e-6', '--output', str(out), '--name', 'run']) == 130
    out_text = capsys.readouterr().out
    config = json.loads((out / 'run' / 'config.json').read_text())['config']
    plan = plan_schedule(180.0, 0.0, FAKE, batches_per_epoch=8, warmup_fraction=0.05)
    # the run's own set-up time shifts the plan by at most an epoch
    assert abs(config['epochs'] - plan.epochs) <= 1 and config['epochs'] > 2
    assert config['warmup_epochs'] == pytest.approx(0.05 * config['epochs'], abs=1e-3)
    assert config['time_budget'] == '3m' and (config['train_batches'] or 8) <= 8
    assert f'the schedule is {config["epochs"]} epochs' in out_text and 'measured 0.5 images/s training' in out_text
    assert len(measured) == 1

    assert main(['train', '--resume', str(out / 'run'), '--quiet']) == 0
    assert len(measured) == 1  # the resumed run keeps its plan
    resumed = json.loads((out / 'run' / 'config.json').read_text())['config']
    assert resumed == config
    history = json.loads((out / 'run' / 'metrics.json').read_text())
    assert [row['epoch'] for row in history] == list(range(1, config['epochs'] + 1))
    assert history[-1]['lr'] == pytest.approx(1e-6, rel=1e-3)  # annealed: the cosine decay ends at --min-lr


def test_the_planner_and_the_fitted_defaults_refuse_impossible_inputs():
    from boatvit.recipes import fit_finetune_to_data, fit_to_data

    for bad in (dict(budget=0.0), dict(batches_per_epoch=0), dict(warmup_fraction=1.0), dict(spent=-1.0)):
        args = dict(budget=60.0, spent=0.0, times=CIFAR, batches_per_epoch=10, warmup_fraction=0.1, **{})
        args.update(bad)
        with pytest.raises(ValueError, match='plan_schedule needs'):
            plan_schedule(**args)
    with pytest.raises(ValueError, match='positive step time'):
        plan_schedule(60.0, 0.0, StepTimes(0.0, 1.0, 1.0), 10, 0.1)
    with pytest.raises(ValueError, match='at least one image'):
        fit_to_data(0, 32)
    with pytest.raises(ValueError, match='fit_finetune_to_data needs at least one image, got 0'):
        fit_finetune_to_data(0)


def test_the_plan_holds_within_its_tolerance_and_is_redone_past_it():
    times = StepTimes(step=1.0, eval_epoch=5.0, save_epoch=1.0)  # 96 s an epoch of 90 batches
    usable = 1000 * (1 - SAFETY_MARGIN)

    def replan(elapsed, done, step=1.0, epochs=10, batches=90):
        return replan_schedule(1000, elapsed, dataclasses.replace(times, step=step), done, epochs, batches, 100)

    # 10 epochs of 96 s end at 960 s, inside the usable 970, and drifts within the tolerance keep the plan
    # (the projected end drifts by 810 (step - 1) - 10 s: nine epochs of 90 batches left)
    within, past = (1 + (f * REPLAN_TOLERANCE * 1000 + 10) / 810 for f in (0.9, 1.1))
    assert replan(96, 1) is None and replan(96, 1, step=within) is None and replan(96, 1, step=past) is not None
    # the machine got twice as fast after the first epoch: the time left is planned again, and filled
    faster = replan(96, 1, step=0.5)
    assert faster.epochs > 9 and 96 + faster.seconds <= usable and 96 + faster.seconds >= usable * 0.95
    # twice as slow: fewer epochs (or shorter ones), ending inside the budget and near its end
    slower = replan(96, 1, step=2.0)
    assert slower.epochs < 9 and usable * 0.95 <= 96 + slower.seconds <= usable
    assert slower.batches_per_epoch <= 100 and faster.warmup_epochs == slower.warmup_epochs == 0
    # no time left for even a step: one more epoch of one step, to end annealed; a finished run stays finished
    last = replan(995, 3)
    assert (last.epochs, last.batches_per_epoch) == (1, 1) and last.seconds == pytest.approx(1 + 5 + 1)
    assert replan(2000, 10) is None
    with pytest.raises(ValueError, match='replan_schedule needs'):
        replan(10, 1, batches=101)


@pytest.mark.parametrize('speed', [0.5, 2.0])
def test_a_budgeted_run_replans_when_its_epochs_change_speed_and_still_ends_annealed(
    tmp_path, capsys, monkeypatch, speed
):
    """Measured at 8 s a batch, the epochs then take ``speed`` times the planned time (the clock is faked, the
    decision is the real `replan_schedule`): the run re-plans once, trains the new number of epochs with its cosine
    decay fitted to them (the lr never jumps up, and ends at the minimum), and writes the new plan into its config;
    interrupted after two epochs and resumed, it keeps that plan."""
    data = make_image_folder(tmp_path / 'data', {'train': {'a': 16, 'b': 16}, 'val': {'a': 2, 'b': 2}})
    monkeypatch.setattr(train_mod, '_measure_run', lambda *args: FAKE)
    planned = {}

    def fake_clock_replan(budget, elapsed, times, done, epochs, batches, full, grad_accum):
        planned.setdefault('epochs', epochs)
        # the epochs run at `speed` times the measured step, whatever the real clock says
        fake = dataclasses.replace(FAKE, step=FAKE.step * speed)
        fake_epoch = batches * fake.step + fake.eval_epoch + fake.save_epoch
        spent = planned.setdefault('spent', [0.0])
        spent[0] += fake_epoch
        decided = replan_schedule(budget, spent[0], fake, done, epochs, batches, full, grad_accum)
        planned.setdefault('decisions', []).append((spent[0], decided))
        return decided

    monkeypatch.setattr(train_mod, 'replan_schedule', fake_clock_replan)
    interrupt_after_two_epochs(monkeypatch)
    out = tmp_path / 'runs'
    argv = ['train', '--data', str(data), *TINY_FLAGS, '--batch-size', '4', '--workers', '0', '--quiet']
    assert main([*argv, '--time-budget', '10m', '--min-lr', '1e-6', '--output', str(out), '--name', 'run']) == 130
    said = capsys.readouterr().out
    config = json.loads((out / 'run' / 'config.json').read_text())['config']
    first_plan = planned['epochs']
    assert (config['epochs'] > first_plan) == (speed < 1) and config['epochs'] != first_plan
    assert f'{config["epochs"]} in all instead of {first_plan}, its cosine decay fitted to them' in said
    decisions = len(planned['decisions'])

    assert main(['train', '--resume', str(out / 'run'), '--quiet']) == 0
    assert len(planned['decisions']) == decisions  # a resumed run keeps the plan it had
    history = json.loads((out / 'run' / 'metrics.json').read_text())
    assert [row['epoch'] for row in history] == list(range(1, config['epochs'] + 1))
    assert json.loads((out / 'run' / 'config.json').read_text())['config'] == config
    # by the fake clock, the re-planned run ends inside the budget, near its end
    spent, plan = [(spent, plan) for spent, plan in planned['decisions'] if plan is not None][-1]
    assert 0.9 * 600 <= spent + plan.seconds <= 600
    lrs = [row['lr'] for row in history]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(lrs[1:], lrs[2:]))  # no jump after warm-up
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-3)  # annealed over the new number of epochs
