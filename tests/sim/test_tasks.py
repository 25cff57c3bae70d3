"""Tasks and task distributions (sim/tasks.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import yaml

from controller.errors import ConfigError
from sim.tasks import PARAMETER_BOUNDS, ParameterRange, Task, TaskDistribution, load_task, save_task

TASK_FIELDS = [f.name for f in dataclasses.fields(Task)]


# -- Task -------------------------------------------------------------------------------------------


def test_task_defaults_vector_and_bounds_table():
    task = Task()
    assert list(task.to_dict().items())[:6] == [
        ("friction", 1.0),
        ("added_mass", 0.0),
        ("motor_strength", 1.0),
        ("kp_scale", 1.0),
        ("kd_scale", 1.0),
        ("command_vx", 0.5),
    ]
    # Every later field defaults to "no effect": scales 1, everything else 0 (flat ground, no noise, no delay).
    later = {key: value for key, value in task.to_dict().items() if key not in list(task.to_dict())[:6]}
    assert later == {
        key: (1.0 if key == "link_mass_scale" else 0.3 if key == "terrain_feature" else 0.0) for key in later
    }
    vector = Task(friction=0.25, command_vx=-1.0, latency=0.01, seed=7).vector()
    assert vector.dtype == np.float32
    assert len(vector) == len(TASK_FIELDS) - 1  # all but the seed
    np.testing.assert_array_equal(vector[:6], [0.25, 0.0, 1.0, 1.0, 1.0, -1.0])
    assert vector[TASK_FIELDS.index("latency")] == np.float32(0.01)
    assert 7.0 not in vector
    assert sorted(PARAMETER_BOUNDS) == sorted(TASK_FIELDS)  # every parameter has physical bounds


@pytest.mark.parametrize(
    ("name", "value"),
    [("friction", -0.1), ("added_mass", -5.0), ("motor_strength", 0.0), ("kp_scale", 10.0), ("command_vx", 4.0)],
)
def test_task_outside_physical_range_names_the_key(name, value):
    with pytest.raises(ConfigError, match=f"'{name}' = {value} is outside its physical range"):
        Task(**{name: value})


def test_task_non_finite_or_unknown():
    with pytest.raises(ConfigError, match="'friction' must be a finite number"):
        Task(friction=math.nan)
    with pytest.raises(ConfigError, match="'kd_scale' must be a finite number"):
        Task(kd_scale="1.0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'task\.frcition'.*friction"):
        Task.from_dict({"frcition": 0.5})
    assert Task.from_dict(None) == Task()


def test_save_and_load_task_round_trip(tmp_path):
    task = Task(friction=0.35, added_mass=2.5, motor_strength=0.9, kp_scale=1.1, kd_scale=0.8, command_vx=0.75)
    path = tmp_path / "task.yaml"
    save_task(task, path)
    assert yaml.safe_load(path.read_text()) == task.to_dict()
    assert load_task(path) == task
    path.write_text("friction: 0.5\nmass: 1.0\n")
    with pytest.raises(ConfigError, match="'task.mass'"):
        load_task(path)


# -- TaskDistribution.from_dict ---------------------------------------------------------------------


def test_uniform_range():
    distribution = TaskDistribution.from_dict({"friction": {"low": 0.3, "high": 1.2}})
    assert distribution.ranges == {"friction": ParameterRange(low=0.3, high=1.2)}
    tasks = distribution.sample_tasks(400, np.random.default_rng(0))
    values = np.array([task.friction for task in tasks])
    assert values.min() >= 0.3 and values.max() <= 1.2
    assert values.mean() == pytest.approx(0.75, abs=0.05)
    # Parameters not named stay nominal.
    assert {task.added_mass for task in tasks} == {0.0}
    assert {task.command_vx for task in tasks} == {0.5}
    # The draw is rng.uniform(low, high) on the generator handed in.
    first = distribution.sample_tasks(1, np.random.default_rng(7))[0].friction
    assert first == np.random.default_rng(7).uniform(0.3, 1.2)


def test_log_uniform_range():
    distribution = TaskDistribution.from_dict({"kp_scale": {"low": 0.5, "high": 2.0, "log": True}})
    assert distribution.ranges["kp_scale"].log
    values = np.array([t.kp_scale for t in distribution.sample_tasks(400, np.random.default_rng(1))])
    assert values.min() >= 0.5 and values.max() <= 2.0
    # Uniform in log space: log values centre on log(sqrt(0.5 * 2)) = 0, half of them below 1.
    assert np.log(values).mean() == pytest.approx(0.0, abs=0.08)
    assert np.mean(values < 1.0) == pytest.approx(0.5, abs=0.08)
    assert distribution.nominal().kp_scale == pytest.approx(1.0)


def test_choices_and_scalar():
    distribution = TaskDistribution.from_dict({"command_vx": [0.0, 0.5, 1.0], "added_mass": 2.0})
    assert distribution.ranges["command_vx"] == ParameterRange(choices=[0.0, 0.5, 1.0])
    assert distribution.ranges["added_mass"] == ParameterRange(choices=[2.0])
    tasks = distribution.sample_tasks(60, np.random.default_rng(2))
    assert {t.command_vx for t in tasks} == {0.0, 0.5, 1.0}
    assert {t.added_mass for t in tasks} == {2.0}
    explicit = TaskDistribution.from_dict({"command_vx": {"choices": [0.0, 0.5, 1.0]}})
    assert explicit.ranges == {"command_vx": distribution.ranges["command_vx"]}


def test_shipped_config_tasks_build():
    from pathlib import Path

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "a1_terrain.yaml").read_text())
    distribution = TaskDistribution.from_dict(data["tasks"])
    assert set(distribution.ranges) == {"friction", "added_mass", "motor_strength", "kp_scale", "command_vx"}
    assert distribution.nominal() == Task(friction=0.75, added_mass=2.0, motor_strength=1.0, kp_scale=1.0)


def test_unknown_parameter_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        TaskDistribution.from_dict({"friction": 1.0, "gravity": {"low": 9.0, "high": 10.0}})
    message = str(info.value)
    assert "'tasks.gravity'" in message
    for valid in TASK_FIELDS:
        assert valid in message
    with pytest.raises(ConfigError, match=r"'tasks\.friction\.lo'"):
        TaskDistribution.from_dict({"friction": {"lo": 0.1, "high": 1.0}})


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"friction": {"low": -0.5, "high": 1.0}}, "friction"),
        ({"added_mass": -5}, "added_mass"),
        ({"added_mass": {"low": -5.0, "high": 1.0}}, "added_mass"),
        ({"motor_strength": 0}, "motor_strength"),
        ({"motor_strength": [0.5, 0.0]}, "motor_strength"),
        ({"kd_scale": {"low": 0.5, "high": 50.0, "log": True}}, "kd_scale"),
    ],
)
def test_out_of_physical_range_names_the_key(spec, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TaskDistribution.from_dict(spec)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"low": 1.0, "high": 0.5}, "low 1.0 > high 0.5"),
        ({"low": 0.5}, "needs 'low' and 'high'"),
        ({"low": 0.0, "high": 1.0, "log": True}, "log-uniform needs low > 0"),
        ({"choices": []}, "non-empty 'choices'"),
        ({"choices": [0.5], "low": 0.1}, "either non-empty 'choices' or 'low'/'high'"),
    ],
)
def test_malformed_ranges(spec, match):
    with pytest.raises(ConfigError, match=match):
        TaskDistribution.from_dict({"friction": spec})


# -- sampling ---------------------------------------------------------------------------------------


def test_sample_tasks_is_deterministic_for_a_seeded_generator():
    distribution = TaskDistribution.from_dict(
        {
            "friction": {"low": 0.3, "high": 1.2},
            "kp_scale": {"low": 0.5, "high": 2.0, "log": True},
            "command_vx": [0, 1],
        }
    )
    first = distribution.sample_tasks(5, np.random.default_rng(42))
    assert first == distribution.sample_tasks(5, np.random.default_rng(42))
    assert first != distribution.sample_tasks(5, np.random.default_rng(43))
    assert len({t.friction for t in first}) == 5
    # One generator drawn twice continues its stream: 3 + 2 tasks equal 5 tasks in one go.
    rng = np.random.default_rng(42)
    assert distribution.sample_tasks(3, rng) + distribution.sample_tasks(2, rng) == first
    assert distribution.sample_tasks(0, np.random.default_rng(0)) == []


def test_to_dict_round_trip():
    distribution = TaskDistribution.from_dict(
        {"friction": {"low": 0.3, "high": 1.2}, "kp_scale": {"low": 0.5, "high": 2.0, "log": True}, "command_vx": 0.5}
    )
    assert distribution.to_dict() == {
        "friction": {"low": 0.3, "high": 1.2},
        "kp_scale": {"low": 0.5, "high": 2.0, "log": True},
        "command_vx": {"choices": [0.5]},
    }
    assert TaskDistribution.from_dict(distribution.to_dict()) == distribution


def test_to_dict_keeps_a_zero_bound():
    distribution = TaskDistribution.from_dict({"added_mass": {"low": 0.0, "high": 4.0}})
    assert distribution.to_dict() == {"added_mass": {"low": 0.0, "high": 4.0}}


# -- re-centring ------------------------------------------------------------------------------------


def test_recentred_keeps_width_and_moves_centre():
    distribution = TaskDistribution.from_dict(
        {
            "friction": {"low": 0.3, "high": 1.2},
            "kp_scale": {"low": 0.5, "high": 2.0, "log": True},
            "command_vx": [0.0, 1.0],
        }
    )
    moved = distribution.recentred({"friction": 0.6, "kp_scale": 1.5, "command_vx": 0.25, "added_mass": 1.0})
    friction = moved.ranges["friction"]
    assert friction.low == pytest.approx(0.15) and friction.high == pytest.approx(1.05)  # 0.6 -+ 0.45
    assert friction.high - friction.low == pytest.approx(0.9)
    assert friction.centre() == pytest.approx(0.6)
    kp = moved.ranges["kp_scale"]
    assert kp.log
    assert kp.low == pytest.approx(0.75) and kp.high == pytest.approx(3.0)  # 1.5 /* sqrt(2.0 / 0.5)
    assert kp.centre() == pytest.approx(1.5)
    assert moved.ranges["command_vx"] == ParameterRange(choices=[0.25])
    assert moved.ranges["added_mass"] == ParameterRange(choices=[1.0])  # not randomized before: fixed
    nominal = moved.nominal()
    assert nominal.friction == pytest.approx(0.6) and nominal.kp_scale == pytest.approx(1.5)
    assert (nominal.command_vx, nominal.added_mass) == (0.25, 1.0)
    # The original distribution is unchanged.
    assert distribution.ranges["friction"] == ParameterRange(low=0.3, high=1.2)
    assert "added_mass" not in distribution.ranges


def test_recentred_past_a_physical_bound_is_refused():
    distribution = TaskDistribution.from_dict({"friction": {"low": 0.3, "high": 1.2}})
    with pytest.raises(ConfigError, match="'friction'"):
        distribution.recentred({"friction": 0.1})  # low would be 0.1 - 0.45 < 0


def test_recentred_unknown_name_is_a_config_error():
    distribution = TaskDistribution.from_dict({"friction": {"low": 0.3, "high": 1.2}})
    with pytest.raises(ConfigError, match="bogus"):
        distribution.recentred({"bogus": 1.0})


# -- the randomization fields -----------------------------------------------------------------------

NEW_FIELDS = TASK_FIELDS[6:]


@pytest.mark.parametrize("name", NEW_FIELDS)
def test_every_new_field_is_bounded_and_names_itself_when_out_of_range(name):
    low, high = PARAMETER_BOUNDS[name]
    assert low is not None and high is not None and low < high
    default = getattr(Task(), name)
    assert low <= default <= high  # the nominal value is physical
    for value in (low - 1.0, high + 1.0):
        with pytest.raises(ConfigError, match=f"'{name}' = {value} is outside its physical range"):
            Task(**{name: value})
    with pytest.raises(ConfigError, match=f"'{name}'"):
        TaskDistribution.from_dict({name: {"low": low, "high": high + 1.0}})


def test_terrain_is_a_category_and_the_seed_an_integer():
    with pytest.raises(ConfigError, match=r"'terrain' = 1.5 must be one of 0 \(flat\), 1 \(rough\), 2 \(slope\), 3"):
        Task(terrain=1.5)
    with pytest.raises(ConfigError, match="'terrain': a category, give 'choices'"):
        TaskDistribution.from_dict({"terrain": {"low": 0, "high": 3}})
    distribution = TaskDistribution.from_dict({"terrain": [0, 1, 3], "seed": {"low": 0, "high": 1000}})
    tasks = distribution.sample_tasks(50, np.random.default_rng(0))
    assert {t.terrain for t in tasks} == {0.0, 1.0, 3.0}
    assert all(t.seed == int(t.seed) for t in tasks) and len({t.seed for t in tasks}) > 40
    assert Task(seed=7.9).seed == 7.0  # rounded down


def test_old_task_files_load_with_every_new_field_nominal(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "configs" / "tasks" / "a1_heldout_slippery.yaml"
    task = load_task(shipped)
    assert task == Task(friction=0.2, added_mass=5.0, motor_strength=0.75)
    for name in NEW_FIELDS:
        assert getattr(task, name) == getattr(Task(), name)
    task = Task(latency=0.02, terrain=1, terrain_amplitude=0.05, seed=3, noise_gyro=0.01)
    save_task(task, tmp_path / "task.yaml")
    assert load_task(tmp_path / "task.yaml") == task


def test_sample_tasks_draws_new_fields_generically():
    distribution = TaskDistribution.from_dict(
        {
            "latency": {"low": 0.0, "high": 0.02},
            "joint_damping": {"low": 0.05, "high": 0.5, "log": True},
            "terrain": [0, 1],
            "terrain_amplitude": {"low": 0.0, "high": 0.05},
            "push_interval_s": 2.0,
        }
    )
    tasks = distribution.sample_tasks(100, np.random.default_rng(1))
    latencies = np.array([t.latency for t in tasks])
    assert latencies.min() >= 0.0 and latencies.max() <= 0.02 and latencies.std() > 0.004
    assert {t.push_interval_s for t in tasks} == {2.0}
    assert {t.noise_gyro for t in tasks} == {0.0}  # not named: nominal
    assert distribution.sample_tasks(100, np.random.default_rng(1)) == tasks
    assert distribution.nominal().latency == pytest.approx(0.01)
    assert distribution.nominal().terrain == 0.0  # a category: its first choice, not the mean
    moved = distribution.recentred({"latency": 0.015})
    assert moved.ranges["latency"].low == pytest.approx(0.005)
