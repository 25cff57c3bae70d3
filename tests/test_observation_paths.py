"""DESIGN contract 2: the sim path and the deploy path build the identical observation from one robot state.

Sim path: `LocomotionEnv` reads a `RobotState` from PyBullet and observes it with its mapping.
Deploy path: the same readings travel as a protocol `State` frame (float32 on the wire), become a
`RobotState` in `deploy.robot.RobotEnv.robot_state`, and are observed by the deploy side's own,
fresh mapping, advanced with the same actions. Both mappings must be the one class from controller/.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import controller.mapping
import deploy.robot
import sim.env
from controller.mapping import LocomotionReward, ObservationMapping, RobotState
from deploy.messages import Mode, State, StateFlag
from deploy.protocol import decode_frame, encode_frame
from deploy.robot import RobotEnv
from deploy.robot_states import Calibration
from sim.env import LocomotionEnv
from sim.tasks import Task

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 12
TASK = Task(friction=0.8, added_mass=1.0, command_vx=0.75)


def actions(num_steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sequence = [rng.uniform(-1.0, 1.0, 12) for _ in range(num_steps)]
    sequence[3] = np.full(12, 2.5)  # clipped to 1 by both mappings
    sequence[7][5] = np.nan  # replaced by zeros by both mappings
    return sequence


def rounded(state: RobotState) -> RobotState:
    """The state as the wire carries it: every float vector through float32."""
    changes = {}
    for item in dataclasses.fields(state):
        value = getattr(state, item.name)
        if isinstance(value, np.ndarray) and item.name != "command":  # the host's command never travels
            changes[item.name] = value.astype(np.float32).astype(np.float64)
    return dataclasses.replace(state, **changes)


def to_message(state: RobotState, tick: int, offsets: np.ndarray | None = None, gyro_bias=None) -> State:
    """What a robot (whose encoders read true + offset, gyro true + bias) sends for `state`."""
    return State(
        tick=tick,
        time=state.time,
        mode=Mode.POSITION,
        flags=StateFlag.FALLEN if state.fallen else StateFlag(0),
        joint_pos=state.joint_pos + (0.0 if offsets is None else offsets),
        joint_vel=state.joint_vel,
        joint_torque=state.joint_torque,
        quat=state.quat,
        gyro=state.gyro + (0.0 if gyro_bias is None else gyro_bias),
        accel=state.accel,
        base_vel=state.base_vel,
    )


def over_the_wire(message: State, seq: int) -> State:
    frame = encode_frame(message, seq)
    assert frame.endswith(b"\x00")
    decoded_seq, decoded = decode_frame(frame[:-1])  # the decoder takes the frame without its delimiter
    assert decoded_seq == seq
    return decoded


@pytest.fixture(scope="module")
def spec():
    from controller.robot import load_robot_spec

    return load_robot_spec("a1")


def test_one_mapping_class_serves_both_paths(spec):
    env = LocomotionEnv(spec, TASK)
    robot = RobotEnv("loop://", spec)  # not connected: robot_state needs only the spec and calibration
    try:
        assert type(env.mapping) is ObservationMapping
        assert type(robot.mapping) is ObservationMapping
        assert env.mapping is not robot.mapping  # each side owns its per-episode state
        for name in ("ObservationMapping", "RobotState", "LocomotionReward"):
            assert getattr(sim.env, name) is getattr(controller.mapping, name)
            assert getattr(deploy.robot, name) is getattr(controller.mapping, name)
        assert type(env.reward_fn) is type(robot.reward_fn) is LocomotionReward
        assert env.mapping.layout_hash == robot.mapping.layout_hash
    finally:
        env.close()


def test_no_second_copy_of_the_mapping_in_the_source():
    # Every definition of the mapping's pieces, anywhere in the packages, is in controller/mapping.py.
    names = {"ObservationMapping", "RobotState", "LocomotionReward", "rotate_to_body", "upright", "OBSERVATION_LAYOUT"}
    found: dict[str, list[str]] = {}
    for package in ("controller", "sim", "deploy", "calibration"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                defined = []
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                    defined = [node.name]
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    defined = [t.id for t in targets if isinstance(t, ast.Name)]
                for name in set(defined) & names:
                    found.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert found == {name: ["controller/mapping.py"] for name in names}


def test_sim_and_deploy_paths_build_the_identical_observation(spec):
    env = LocomotionEnv(spec, TASK, joint_noise=0.05)
    robot = RobotEnv("loop://", spec, command=(TASK.command_vx, 0.0, 0.0))
    try:
        obs, _ = env.reset(seed=0)
        robot.mapping.reset()
        steps = [(obs, None, None)]
        previous = np.zeros(12)
        for action in actions(NUM_STEPS):
            obs, reward, terminated, _, _ = env.step(action)
            robot.mapping.targets(action)  # what RobotEnv.step does before sending the Command
            steps.append((obs, reward, terminated))
            sim_state = env.state
            assert robot.mapping.step_count == env.mapping.step_count
            np.testing.assert_array_equal(robot.mapping.last_action, env.mapping.last_action)

            message = to_message(sim_state, tick=env.mapping.step_count)
            decoded = over_the_wire(message, seq=env.mapping.step_count)
            assert decoded == message
            deploy_state = robot.robot_state(decoded)

            # The deploy state is the sim state rounded to float32, field by field.
            wire_state = rounded(sim_state)
            for name in ("joint_pos", "joint_vel", "quat", "gyro", "accel", "base_vel", "joint_torque", "command"):
                np.testing.assert_array_equal(getattr(deploy_state, name), getattr(wire_state, name), err_msg=name)
            assert deploy_state.fallen == sim_state.fallen
            assert deploy_state.time == sim_state.time

            # The sim path's observation is the mapping of env.state, exactly.
            np.testing.assert_array_equal(obs, env.mapping.observe(sim_state))
            # Identical observations once the sim state is rounded to the wire format.
            deploy_obs = robot.mapping.observe(deploy_state)
            assert deploy_obs.dtype == obs.dtype == np.float32
            np.testing.assert_array_equal(deploy_obs, env.mapping.observe(wire_state))
            # Without the rounding they differ by float32 rounding only.
            np.testing.assert_allclose(deploy_obs, obs, rtol=0, atol=1e-6)
            # Reward and fall detection agree as well.
            deploy_reward = robot.reward_fn(deploy_state, robot.mapping.last_action, previous)
            assert deploy_reward == pytest.approx(reward, abs=1e-5)
            assert robot.mapping.is_fallen(deploy_state) == terminated
            previous = robot.mapping.last_action.copy()
        assert robot.mapping.nonfinite_actions == env.mapping.nonfinite_actions == 1
        assert len({o.tobytes() for o, _, _ in steps}) == len(steps)  # the robot really moved
    finally:
        env.close()


def test_deploy_calibration_undoes_sensor_offsets(spec):
    offsets = np.linspace(-0.05, 0.05, 12)
    gyro_bias = np.array([0.01, -0.02, 0.03])
    env = LocomotionEnv(spec, TASK)
    robot = RobotEnv(
        "loop://",
        spec,
        command=(TASK.command_vx, 0.0, 0.0),
        calibration=Calibration(joint_offsets=offsets, gyro_bias=gyro_bias),
    )
    try:
        env.reset(seed=1)
        for action in actions(NUM_STEPS)[:4]:
            obs, *_ = env.step(action)
            robot.mapping.targets(action)
        message = over_the_wire(to_message(env.state, 4, offsets, gyro_bias), seq=4)
        # A biased robot reads differently, and the host's calibration brings it back.
        assert not np.allclose(message.joint_pos, env.state.joint_pos, atol=1e-3)
        np.testing.assert_allclose(robot.mapping.observe(robot.robot_state(message)), obs, rtol=0, atol=1e-6)
    finally:
        env.close()
