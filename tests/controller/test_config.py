"""YAML -> dataclasses (controller/config.py) and the robot spec loader built on it (controller/robot.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from controller.config import apply_overrides, build, check_range, load_yaml, to_dict
from controller.errors import ConfigError
from controller.robot import ROBOTS_DIR, RobotSpec, load_robot_spec, robot_spec_from_dict
from sim.training import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Inner:
    """A nested section."""

    rate: float = 1.0
    widths: list[int] = field(default_factory=lambda: [8, 8])


@dataclass
class Outer:
    """A top-level section with a nested one and an optional nested one."""

    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None


# -- build ------------------------------------------------------------------------------------------


def test_build_nested_and_optional_sections():
    config = build(Outer, {"name": "y", "inner": {"rate": 2.5}, "extra": {"widths": [3]}})
    assert config == Outer(name="y", inner=Inner(rate=2.5), extra=Inner(widths=[3]))
    assert build(Outer, None) == Outer()
    assert build(Outer, {"extra": None}).extra is None


def test_build_works_on_a_copy():
    data = {"inner": {"widths": [1, 2]}}
    config = build(Outer, data)
    config.inner.widths.append(3)
    assert data == {"inner": {"widths": [1, 2]}}


def test_build_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as info:
        build(Outer, {"nmae": "typo"})
    message = str(info.value)
    assert "'nmae'" in message
    for valid in ("name", "inner", "extra"):
        assert valid in message


def test_build_unknown_nested_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"'inner\.bogus'.*valid keys under 'inner': rate, widths"):
        build(Outer, {"inner": {"bogus": 1}})


def test_build_non_mapping_section_and_bad_value():
    with pytest.raises(ConfigError, match="must be a mapping"):
        build(Outer, [1, 2])  # type: ignore[arg-type]

    @dataclass
    class Required:
        needed: int

    with pytest.raises(ConfigError, match="bad value in 'Required'"):
        build(Required, {})


def test_train_config_rejects_unknown_nested_ppo_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("robot: a1\nmlsh:\n  sub_ppo:\n    bogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    message = str(info.value)
    assert "'mlsh.sub_ppo.bogus'" in message
    for valid in ("clip_ratio", "entropy_coef", "learning_rate", "target_kl"):
        assert valid in message


def test_train_config_rejects_unknown_top_level_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("robto: a1\n")
    with pytest.raises(ConfigError, match=r"'robto'.*mlsh.*robot.*sampler"):
        load_train_config(path)


def test_shipped_train_config_loads_and_round_trips():
    config = load_train_config(REPO / "configs" / "a1_terrain.yaml")
    assert config.robot == "a1"
    assert config.mlsh.num_task_groups == 120
    assert config.policy.sub_hidden == [64, 64]
    assert config.tasks["friction"] == {"low": 0.3, "high": 1.2}
    # to_dict gives plain YAML-safe values that build back into the same config.
    plain = to_dict(config)
    yaml.safe_dump(plain)
    assert build(TrainConfig, plain) == config


# -- load_yaml --------------------------------------------------------------------------------------


def test_load_yaml_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: 1\n b: 2\n")  # the indented key is on line 2
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 2" in message


def test_load_yaml_missing_empty_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level, got list"):
        load_yaml(tmp_path / "list.yaml")


# -- apply_overrides --------------------------------------------------------------------------------


def test_apply_overrides_sets_nested_values_on_a_copy():
    data = {"mlsh": {"num_task_groups": 120, "gamma": 0.99}, "seed": 0}
    result = apply_overrides(data, ["mlsh.num_task_groups=3", "seed=7", "policy.sub_hidden=[16, 16]", "run_dir=null"])
    assert result == {
        "mlsh": {"num_task_groups": 3, "gamma": 0.99},
        "seed": 7,
        "policy": {"sub_hidden": [16, 16]},
        "run_dir": None,
    }
    assert data == {"mlsh": {"num_task_groups": 120, "gamma": 0.99}, "seed": 0}
    assert isinstance(result["mlsh"]["num_task_groups"], int)


def test_apply_overrides_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["mlsh.num_task_groups"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["=3"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        apply_overrides({"seed": 0}, ["seed.value=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["a=[1, 2"])


def test_load_train_config_with_override(tmp_path):
    config = load_train_config(REPO / "configs" / "a1_terrain.yaml", ["mlsh.num_task_groups=3"])
    assert config.mlsh.num_task_groups == 3
    assert config.mlsh.warmup_iterations == 2  # the rest of the section is untouched
    with pytest.raises(ConfigError, match="'mlsh.sub_ppo.bogus'"):
        load_train_config(None, ["mlsh.sub_ppo.bogus=1"])


def test_check_range():
    check_range("x", 0.5, 0.0, 1.0)
    with pytest.raises(ConfigError, match="'x' must be >= 0.0, got -1"):
        check_range("x", -1, 0.0)
    with pytest.raises(ConfigError, match="'x' must be <= 1.0"):
        check_range("x", 2.0, high=1.0)
    with pytest.raises(ConfigError):
        check_range("x", float("nan"), 0.0)  # NaN fails every comparison


# -- robot spec (controller/robot.py) ---------------------------------------------------------------


def a1_dict() -> dict:
    return yaml.safe_load((ROBOTS_DIR / "a1.yaml").read_text())


def test_load_robot_spec_a1():
    spec = load_robot_spec("a1")
    assert isinstance(spec, RobotSpec)
    assert spec.name == "a1"
    assert spec.num_joints == 12
    assert spec.joint_names[:3] == ["FR_hip_joint", "FR_upper_joint", "FR_lower_joint"]
    assert spec.decimation == 4  # 1 / (50 Hz * 0.005 s)
    assert spec.gait.frequency_hz == 2.5
    assert spec.array("default_pose").shape == (12,)
    assert load_robot_spec(ROBOTS_DIR / "a1.yaml") == spec
    assert spec.fingerprint() == load_robot_spec("a1").fingerprint()


def test_unknown_robot_lists_known_robots():
    with pytest.raises(ConfigError, match=r"unknown robot 'b2'; known robots: .*a1"):
        load_robot_spec("b2")


def test_wrong_length_list_is_refused_naming_the_key():
    data = a1_dict()
    data["default_pose"] = data["default_pose"][:-1]
    with pytest.raises(ConfigError, match="'default_pose' has 11 values, expected 12"):
        robot_spec_from_dict(data)
    data = a1_dict()
    data["torque_limit"] = [*data["torque_limit"], 1.0]
    with pytest.raises(ConfigError, match="'torque_limit' has 13 values"):
        robot_spec_from_dict(data)
    data = a1_dict()
    data["gait"]["swing"] = [0.1]
    with pytest.raises(ConfigError, match="'gait.swing' must have 12 values"):
        robot_spec_from_dict(data)


def test_robot_spec_other_checks():
    data = a1_dict()
    data["sim_timestep"] = 0.003  # 1 / (50 * 0.003) = 6.67 physics steps per control step
    with pytest.raises(ConfigError, match="must be an integer"):
        robot_spec_from_dict(data)
    data = a1_dict()
    data["kp_gain"] = 1.0
    with pytest.raises(ConfigError, match="'robot.kp_gain'"):
        robot_spec_from_dict(data)
    data = a1_dict()
    data["gait"]["bogus"] = 1
    with pytest.raises(ConfigError, match="'robot.gait.bogus'"):
        robot_spec_from_dict(data)
    data = a1_dict()
    data["joint_lower"][0] = 1.0  # above joint_upper[0] = 0.8
    with pytest.raises(ConfigError, match="joint_lower exceeds joint_upper"):
        robot_spec_from_dict(data)
