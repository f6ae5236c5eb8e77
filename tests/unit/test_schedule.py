"""lr_over_minutes: the lr decays over the share of the time budget used, not over steps."""

import math
from types import SimpleNamespace

import pytest
from tiny_targets import tiny_draft, tiny_target

from baldeagle.config import ConfigError, TrainConfig
from baldeagle.train.objective import DraftObjective
from baldeagle.train.run import check_settings
from baldeagle.train.schedule import minutes_schedule
from baldeagle.train.trainer import EagleTrainer, TimeBudget


def test_factor_is_warm_up_times_the_decay_at_the_share_used():
    share = [0.0]
    cosine = minutes_schedule("cosine", 4, lambda: share[0])
    assert cosine(0) == 0.0 and cosine(2) == 0.5 and cosine(4) == 1.0  # warm-up in steps
    share[0] = 0.5
    assert cosine(100) == pytest.approx(0.5)  # (1 + cos(π/2)) / 2
    share[0] = 0.25
    assert cosine(100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    share[0] = 1.3  # the last step ends past the budget: clamped, never negative
    assert cosine(100) == 0.0
    share[0] = 0.25
    assert minutes_schedule("linear", 0, lambda: share[0])(7) == pytest.approx(0.75)
    share[0] = 0.05  # warm-up below 1: a share of the minutes (half of a 10% warm-up here)
    assert minutes_schedule("linear", 0.1, lambda: share[0])(1) == pytest.approx(0.5 * 0.95)
    with pytest.raises(ValueError, match="cosine or linear"):
        minutes_schedule("constant_with_warmup", 0, lambda: 0.0)


def test_the_trainer_paces_the_lr_by_the_budget_clock(tmp_path):
    """The scheduler reads the budget's clock at every step: the lr after a step is the peak times
    the cosine at the share of minutes gone, whatever the number of steps."""
    now = [1000.0]
    budget = TimeBudget(minutes=10.0, clock=lambda: now[0])
    draft, _ = tiny_draft(tiny_target("llama"), "eagle3")
    args = TrainConfig(out=str(tmp_path / "out"), learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=2,
                       max_minutes=10.0, lr_over_minutes=True)
    trainer = EagleTrainer(model=DraftObjective(draft), args=args, features=None, time_budget=budget)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)  # the step count it is told is ignored
    budget.on_train_begin(args, None, SimpleNamespace())
    lrs = []
    for minutes in (0.0, 1.0, 5.0, 9.0, 10.5):
        now[0] = 1000.0 + 60 * minutes
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
    # step 1: half-way through its 2 warm-up steps; then the cosine at 1/10, 5/10, 9/10 and past the end
    cos = [(1 + math.cos(math.pi * f)) / 2 for f in (0.0, 0.1, 0.5, 0.9)]
    assert lrs == pytest.approx([2e-3 * 0.5 * cos[0], 2e-3 * cos[1], 2e-3 * cos[2], 2e-3 * cos[3], 0.0])


def test_without_the_key_the_trainer_keeps_its_step_schedule(tmp_path):
    draft, _ = tiny_draft(tiny_target("llama"), "eagle3")
    args = TrainConfig(out=str(tmp_path / "out"), learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0)
    trainer = EagleTrainer(model=DraftObjective(draft), args=args, features=None)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    for _ in range(2):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 2 / 4)  # linear over 4 steps


@pytest.mark.parametrize("changes, message", [
    (dict(lr_scheduler_type="cosine"), "set max_minutes > 0"),
    (dict(lr_scheduler_type="constant_with_warmup", max_minutes=5.0), "cosine or linear, got 'constant_with_warmup'"),
])
def test_a_schedule_over_minutes_that_cannot_be_laid_out_is_refused(changes, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        check_settings(TrainConfig(out=str(tmp_path / "out"), lr_over_minutes=True, **changes))
