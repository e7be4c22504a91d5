"""Learning-rate schedules: values at the landmarks, picklability, validation."""
from __future__ import annotations

import math
import pickle

import pytest

from distopt.optim import adam, sgd
from distopt.optim.rules import lr_at
from distopt.optim.schedules import Constant, WarmupCosine, constant, make_schedule, warmup_cosine


def test_constant_without_warmup_is_flat():
    s = constant(0.1)
    assert [s(k) for k in (1, 2, 1000)] == [0.1, 0.1, 0.1]


def test_constant_warmup_ramps_linearly_from_first_step():
    s = constant(1.0, warmup_steps=4)
    assert [s(k) for k in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_landmarks():
    s = warmup_cosine(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(1) == pytest.approx(0.1)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half-way through the decay: the mean of lr and min_lr
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # stays at the floor past total_steps


def test_cosine_matches_closed_form_and_decreases():
    total, warm = 50, 5
    s = warmup_cosine(2.0, total, warm)
    values = [s(k) for k in range(warm, total + 1)]
    for k, v in zip(range(warm, total + 1), values):
        assert v == pytest.approx(0.5 * 2.0 * (1 + math.cos(math.pi * (k - warm) / (total - warm))))
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("schedule", [constant(0.3, 5), warmup_cosine(0.3, 100, 5, 0.01)])
def test_schedules_pickle_and_drive_rules(schedule):
    back = pickle.loads(pickle.dumps(schedule))
    assert back == schedule and back(7) == schedule(7)
    assert lr_at(adam(lr=schedule).lr, 7) == schedule(7)
    assert lr_at(sgd(lr=schedule, momentum=0.9).lr, 7) == schedule(7)


def test_make_schedule_by_name():
    assert make_schedule("constant", 0.1, 100, 10) == Constant(0.1, 10)
    assert make_schedule("cosine", 0.1, 100, 10, 0.001) == WarmupCosine(0.1, 100, 10, 0.001)


@pytest.mark.parametrize("call, match", [
    (lambda: constant(-1.0), "lr=-1.0 must be a finite float >= 0"),
    (lambda: constant(float("nan")), "must be a finite float"),
    (lambda: constant(0.1, warmup_steps=-1), "warmup_steps=-1 must be an int >= 0"),
    (lambda: warmup_cosine(0.1, total_steps=0), "total_steps=0 must be an int >= 1"),
    (lambda: warmup_cosine(0.1, 100, warmup_steps=100), "use warmup_steps < total_steps"),
    (lambda: warmup_cosine(0.1, 100, min_lr=0.2), "min_lr=0.2 is above lr=0.1"),
    (lambda: make_schedule("linear", 0.1, 100), "use one of constant, cosine"),
    (lambda: make_schedule("constant", 0.1, 100, min_lr=0.01), "only applies to the cosine schedule"),
])
def test_bad_arguments_name_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()
