"""A robot in its own PyBullet world: task dynamics, PD motors, state readout.

Shared by the Gymnasium env and the emulator, so both step the same physics. PD torques are
computed here at the physics rate (not by PyBullet's position motors) so that motor strength,
gain scales and damping mode act on the torque, as on the real robot. The world itself (client,
ground, loaded robot, saved spawn state) is a `sim.robot_world.RobotWorld`; sensor errors and
noise are drawn by `sim.sensor_errors`.

`SimRobot.apply_task` is the one place where a `Task` takes effect: terrain, ground contact,
masses, motors, joint friction, delays, sensor errors and pushes. Per-step work for a feature is
only done when its task value is not nominal, so the nominal hot loop stays as it was.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pybullet

from controller.mapping import RobotState
from controller.robot import RobotSpec
from sim.robot_world import GRAVITY, RobotWorld
from sim.sensor_errors import add_sensor_noise, draw_sensor_errors
from sim.tasks import Task

_ORIGIN = (0.0, 0.0, 0.0)
_IDENTITY = (0.0, 0.0, 0.0, 1.0)


@dataclass
class _Reading:
    """Raw sensor values at one physics step, kept while `latency` delays the readout."""

    step: int
    joint_pos: np.ndarray
    joint_vel: np.ndarray
    quat: tuple
    vel_world: tuple
    ang_world: tuple
    torque: np.ndarray
    time: float


def _gain(gain: np.ndarray | float, scale: float) -> np.ndarray | float:
    """gain * scale; a Python float for a scalar gain (a numpy scalar times an array takes a slow path)."""
    if type(gain) is float:
        return gain * scale
    scaled = np.asarray(gain) * scale
    return float(scaled) if scaled.ndim == 0 else scaled


def _pd_torques(
    law: list[tuple[float, float, float, float, float]], joints, strengths: list[float] | None
) -> list[float]:
    """Motor torques: strength_j * clip(kp_j (q*_j - q_j) - kd_j dq_j, -limit_j, limit_j).

    `law` holds (q*_j, kp_j, kd_j, -limit_j, limit_j) per joint and `joints` (q_j, dq_j, ...) per joint (pybullet's
    joint states). Python floats: the numpy expression's operations in the same order (maximum, then minimum; NaN
    passes through both), so the same doubles, ~3x cheaper on 12 joints than a dozen numpy calls.
    """
    torque = []
    for (target, kp, kd, low, high), joint in zip(law, joints):
        value = kp * (target - joint[0]) - kd * joint[1]
        value = low if value < low else value
        torque.append(high if value > high else value)
    if strengths is not None:
        torque = [factor * value for factor, value in zip(strengths, torque)]
    return torque


def _per_joint(value: np.ndarray | float, n: int) -> list[float]:
    """A gain or scale that is one float or one per joint, as n Python floats."""
    return value.tolist() if isinstance(value, np.ndarray) else [float(value)] * n


def _child_generator(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator from `rng` without drawing from it (the caller's stream is unchanged)."""
    try:
        return rng.spawn(1)[0]
    except TypeError:  # a generator built without a SeedSequence
        return np.random.default_rng(rng.integers(2**63))


class SimRobot:
    """One robot on a plane (or terrain) in a private PyBullet client (DIRECT unless `gui`).

    Args:
        spec: the robot.
        gui: open PyBullet's window.
        seed: seeds `rng`, the generator for sensor noise, sensor errors, control jitter and pushes, until a
            `reset(rng)` replaces it with a child of the caller's generator.
    """

    def __init__(self, spec: RobotSpec, *, gui: bool = False, seed: int = 0) -> None:
        self.spec = spec
        self._world = world = RobotWorld(spec, gui=gui)
        # Held on the robot itself: the per-step code reads them with one attribute lookup.
        self.client, self._client_id = world.client, world.client_id
        self.ground, self.terrain, self.body, self.joint_ids = world.ground, world.terrain, world.body, world.joint_ids
        self.base_mass, self._to_trunk, self._default = world.base_mass, world.to_trunk, world.default_pose
        self._zeros = [0.0] * spec.num_joints
        self._torque_limit = spec.array("torque_limit")
        self._torque_low = -self._torque_limit
        self._torque_limit_list, self._torque_low_list = self._torque_limit.tolist(), self._torque_low.tolist()
        self._decimation = spec.decimation
        self.rng = np.random.default_rng(seed)
        self._applied_coulomb = 0.0  # the joint friction limit sent last; NaN while damping sets it every step
        self._joint_offsets: np.ndarray | None = None
        self._gyro_bias: np.ndarray | None = None
        self._pending: deque = deque()
        self._reading: tuple | None = None  # (physics step, joint states) of the last read_state without latency
        self._history: deque | None = None
        self.sim_time = 0.0
        self.task = Task()
        self.apply_task(self.task)
        self._start_episode()

    # -- task ----------------------------------------------------------------------------------

    def apply_task(self, task: Task) -> None:
        """Make the world and the robot match `task` now; every field takes effect here and nowhere else.

        Dynamics edits survive restoreState, so values set through many calls (link masses, joint friction) are
        only re-sent when they change; the rest is set explicitly every time. Terrain, ground contact and masses
        are the world's (`RobotWorld`); the rest is this robot's motors, timing and sensors.
        """
        previous, self.task = self.task, task
        self._reading = None
        self._grounds = self._world.set_ground(task)
        self._world.set_masses(task)
        # Joint friction is the force limit of a zero-velocity motor beside TORQUE_CONTROL's torque: the solver
        # opposes motion with up to coulomb + damping * |dq| (dq of the step before) and can only bring a joint to
        # rest, never push it back. So dry friction holds a joint still without chattering, and damping stays
        # stable where an explicit -damping * dq term (like the PD's kd) oscillates on light links at 200 Hz.
        self._damping = task.joint_damping if task.joint_damping > 0 else None
        if self._damping is None and task.joint_coulomb != self._applied_coulomb:
            self._set_joint_friction(np.full(self.spec.num_joints, task.joint_coulomb))
        self._strength: float | np.ndarray = task.motor_strength
        if task.motor_strength_spread > 0:
            pattern = np.random.default_rng(int(task.seed)).uniform(-1.0, 1.0, self.spec.num_joints)
            self._strength = task.motor_strength * (1.0 + task.motor_strength_spread * pattern)
        dt = self.spec.sim_timestep
        self._latency_steps = int(round(task.latency / dt))
        if self._latency_steps == 0:
            self._history = None
            while self._pending:  # commands in flight act now
                self._command = self._pending.popleft()[1]
        elif self._history is None or self._history.maxlen != self._latency_steps + 1:
            self._history = deque(maxlen=self._latency_steps + 1)
        self._jitter_steps = task.control_jitter / dt
        com = np.array([task.payload_com_x, task.payload_com_y, 0.0])
        self._com_offset = com if np.any(com) else None
        self._base_weight = (self.base_mass + task.added_mass) * GRAVITY
        self._noisy = any((task.noise_joint_pos, task.noise_joint_vel, task.noise_gyro, task.noise_gravity))
        if (task.joint_offset, task.gyro_bias) != (previous.joint_offset, previous.gyro_bias):
            self._joint_offsets, self._gyro_bias = draw_sensor_errors(task, self.rng, self.spec.num_joints)
        if task.push_interval_s != previous.push_interval_s:
            self._next_push = self.sim_time + task.push_interval_s

    def _set_joint_friction(self, torque: np.ndarray) -> None:
        """Friction torque limit of each joint's zero-velocity motor (num_joints,)."""
        pybullet.setJointMotorControlArray(
            self.body,
            self.joint_ids,
            pybullet.VELOCITY_CONTROL,
            targetVelocities=self._zeros,
            forces=torque,
            physicsClientId=self._client_id,
        )
        self._applied_coulomb = float(torque[0]) if self._damping is None else math.nan

    def per_joint_strength(self) -> np.ndarray:
        """Each motor's torque scale under the current task (num_joints,)."""
        return np.broadcast_to(np.asarray(self._strength, dtype=np.float64), (self.spec.num_joints,)).copy()

    # -- episode -------------------------------------------------------------------------------

    def reset(self, rng: np.random.Generator | None = None, joint_noise: float = 0.0) -> None:
        """Back to the standing pose via a saved state (no reload), with optional joint noise.

        With `rng` (the env's generator) the robot's own generator becomes a child of it, drawn without using
        `rng`'s stream, so a seeded env reset fixes the noise, sensor errors, jitter and pushes of the episode.
        """
        self.client.restoreState(self._world.initial_state)
        if rng is not None:
            if joint_noise > 0:
                noise = rng.uniform(-joint_noise, joint_noise, self.spec.num_joints)
                for joint, angle in zip(self.joint_ids, self._default + noise):
                    self.client.resetJointState(self.body, joint, angle)
            self.rng = _child_generator(rng)
        self.apply_task(self.task)
        self._joint_offsets, self._gyro_bias = draw_sensor_errors(self.task, self.rng, self.spec.num_joints)
        self._start_episode()
        # restoreState leaves the contact points of the last step: a robot that had collapsed would read as
        # fallen until the next step (as the emulator's held robot does after a Reset). Recompute them here.
        pybullet.performCollisionDetection(self._client_id)

    def _start_episode(self) -> None:
        spec, task = self.spec, self.task
        self.last_torque = np.zeros(spec.num_joints)
        self._last_vel_world = (0.0, 0.0, 0.0)
        self.sim_time = 0.0
        self._physics_steps = 0
        self._reading = None
        self._next_push = task.push_interval_s
        # Until the first command arrives (only seen under latency) the motors hold the standing pose.
        hold = self._default if self._joint_offsets is None else self._default - self._joint_offsets
        self._command = (hold, spec.kp * task.kp_scale, spec.kd * task.kd_scale)
        self._pending.clear()
        if self._history is not None:
            self._history.clear()

    # -- physics -------------------------------------------------------------------------------

    def joint_states(self) -> tuple[np.ndarray, np.ndarray]:
        """Joint positions and velocities (num_joints,) each, in the spec's joint order."""
        states = pybullet.getJointStates(self.body, self.joint_ids, self._client_id)
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def step(
        self, targets: np.ndarray, kp: np.ndarray | float, kd: np.ndarray | float, substeps: int | None = None
    ) -> None:
        """Run `substeps` physics steps (default: one control period, jittered by the task) of PD torque control.

        tau_j = strength_j * clip(kp_scale kp (q*_j - offset_j - q_j) - kd_scale kd dq_j, -limit_j, limit_j)

        The command (targets and gains) takes effect `latency` later, counted in physics steps; joint friction
        acts beside this torque (see `apply_task`).
        """
        task, body = self.task, self.body
        num_steps = self._decimation if substeps is None else substeps
        if self._jitter_steps > 0 and substeps is None:
            num_steps = max(1, num_steps + int(round(self.rng.normal(0.0, self._jitter_steps))))
        if task.push_interval_s > 0 and self.sim_time >= self._next_push - 1e-9:
            self._push()
        targets = np.asarray(targets, dtype=np.float64)
        if self._joint_offsets is not None:  # the motor tracks the target in its own (offset) encoder frame
            targets = targets - self._joint_offsets
        command = (targets, _gain(kp, task.kp_scale), _gain(kd, task.kd_scale))
        if self._latency_steps:
            self._pending.append((self._physics_steps + self._latency_steps, command))
        else:
            self._command = command
        # The hot loop: locals only, and no work for a feature whose task value is nominal (x * 1.0 == x exactly).
        n = len(self.joint_ids)
        strength = self._strength
        strengths = None if isinstance(strength, float) and strength == 1.0 else _per_joint(strength, n)
        dt = self.spec.sim_timestep
        body, joint_ids, client_id, torque_control = self.body, self.joint_ids, self._client_id, pybullet.TORQUE_CONTROL
        # Module functions with the client id passed positionally: the cheapest call pybullet offers.
        get_joint_states, set_motors, step_simulation = (
            pybullet.getJointStates,
            pybullet.setJointMotorControlArray,
            pybullet.stepSimulation,
        )
        pending, recording, damping, com = self._pending, self._history is not None, self._damping, self._com_offset
        # The joint states read_state took at this physics step (no step, reset or task change since) are the first
        # substep's reading: the joints are read once per physics step, as in a plain loop.
        reading, self._reading = self._reading, None
        reading = reading[1] if reading is not None and reading[0] == self._physics_steps else None
        law = self._pd_law(self._command)
        torque = None
        if not (pending or recording) and damping is None and com is None:  # nominal features: counters kept local
            sim_time = self.sim_time
            for _ in range(num_steps):
                if reading is None:
                    states = get_joint_states(body, joint_ids, client_id)
                else:
                    states, reading = reading, None
                torque = _pd_torques(law, states, strengths)
                set_motors(body, joint_ids, torque_control, forces=torque, physicsClientId=client_id)
                step_simulation(client_id)
                sim_time += dt
            if torque is not None:
                self.last_torque = np.array(torque)
            self.sim_time = sim_time
            self._physics_steps += num_steps
            return
        for _ in range(num_steps):
            if pending and pending[0][0] <= self._physics_steps:
                while pending and pending[0][0] <= self._physics_steps:
                    self._command = pending.popleft()[1]
                law = self._pd_law(self._command)
            if recording:
                q, dq = self._record()
                joints = list(zip(q.tolist(), dq.tolist()))
            elif reading is None:
                joints = get_joint_states(body, joint_ids, client_id)
            else:
                joints, reading = reading, None
            if damping is not None:
                dq_abs = np.abs(np.array([joint[1] for joint in joints]))
                self._set_joint_friction(task.joint_coulomb + damping * dq_abs)
            torque = _pd_torques(law, joints, strengths)
            set_motors(body, joint_ids, torque_control, forces=torque, physicsClientId=client_id)
            if com is not None:
                self._apply_com_torque()
            step_simulation(client_id)
            self.last_torque = np.array(torque)
            self.sim_time += dt
            self._physics_steps += 1

    def _pd_law(self, command: tuple) -> list[tuple[float, float, float, float, float]]:
        """Per joint (target, kp, kd, -limit, limit) as Python floats, from a (targets, kp, kd) command."""
        targets, kp, kd = command
        n = len(self.joint_ids)
        return list(
            zip(targets.tolist(), _per_joint(kp, n), _per_joint(kd, n), self._torque_low_list, self._torque_limit_list)
        )

    def _trunk_quat(self, quat) -> tuple:
        """Orientation of the trunk frame (x forward, z up) from the URDF base orientation."""
        if self._to_trunk is None:
            return quat
        return pybullet.multiplyTransforms(_ORIGIN, quat, _ORIGIN, self._to_trunk, self._client_id)[1]

    def _apply_com_torque(self) -> None:
        # Gravity acting at the shifted centre of mass: tau = (R d) x (0, 0, -W) = (-W d_y, W d_x, 0) in the world.
        # The inertia stays about the URDF's centre of mass (PyBullet cannot move a link's inertial frame): exact
        # for how the weight loads the legs, quasi-static for the rest.
        client_id = self._client_id
        quat = self._trunk_quat(pybullet.getBasePositionAndOrientation(self.body, client_id)[1])
        offset = pybullet.multiplyTransforms(_ORIGIN, quat, self._com_offset, _IDENTITY, client_id)[0]
        weight = self._base_weight
        self.client.applyExternalTorque(
            self.body, -1, [-weight * offset[1], weight * offset[0], 0.0], pybullet.WORLD_FRAME
        )

    def _push(self) -> None:
        """Add `push_velocity` to the base velocity in a random horizontal direction."""
        angle = self.rng.uniform(0.0, 2.0 * math.pi)
        speed = self.task.push_velocity
        velocity, angular = self.client.getBaseVelocity(self.body)
        pushed = [velocity[0] + speed * math.cos(angle), velocity[1] + speed * math.sin(angle), velocity[2]]
        self.client.resetBaseVelocity(self.body, pushed, angular)
        self._next_push += self.task.push_interval_s

    def _record(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the sensors at this physics step into the latency history (once per step); returns (q, dq)."""
        history = self._history
        if history and history[-1].step == self._physics_steps:
            return history[-1].joint_pos, history[-1].joint_vel
        q, dq = self.joint_states()
        quat = pybullet.getBasePositionAndOrientation(self.body, self._client_id)[1]
        vel_world, ang_world = pybullet.getBaseVelocity(self.body, self._client_id)
        history.append(
            _Reading(self._physics_steps, q, dq, quat, vel_world, ang_world, self.last_torque, self.sim_time)
        )
        return q, dq

    def base_position(self) -> np.ndarray:
        return np.asarray(pybullet.getBasePositionAndOrientation(self.body, self._client_id)[0])

    def trunk_on_ground(self) -> bool:
        body, client_id = self.body, self._client_id
        return any(pybullet.getContactPoints(body, ground, -1, -1, client_id) for ground in self._grounds)

    def read_state(self, command: np.ndarray, dt: float) -> RobotState:
        """The robot's sensors (plus the simulator-only base velocity), all in the trunk frame.

        Under `latency` the sensor values are those of round(latency / sim_timestep) physics steps ago (or the
        oldest since reset); base velocity and `fallen` stay current: they are ground truth for reward and
        termination. Sensor errors (offsets, bias) and noise are added last.
        """
        # Module functions with the client id passed positionally (the cheapest call, as in `step`); tuples in and
        # out of pybullet: it reads a numpy array element by element, ~5x slower than a tuple.
        body, client_id, multiply = self.body, self._client_id, pybullet.multiplyTransforms
        quat = pybullet.getBasePositionAndOrientation(body, client_id)[1]
        vel_world, ang_world = pybullet.getBaseVelocity(body, client_id)
        vel_now = vel_world
        history = self._history
        if history is None:
            states = pybullet.getJointStates(body, self.joint_ids, client_id)
            self._reading = (self._physics_steps, states)  # the next step's first substep reuses it
            q, dq = np.array([s[0] for s in states]), np.array([s[1] for s in states])
            torque, time = self.last_torque.copy(), self.sim_time
        else:
            quat_now = quat
            self._record()
            old = history[0]
            q, dq, quat, vel_world, ang_world = old.joint_pos, old.joint_vel, old.quat, old.vel_world, old.ang_world
            torque, time = old.torque.copy(), old.time
        if self._to_trunk is not None:
            quat = self._trunk_quat(quat)
        inverse = pybullet.invertTransform(_ORIGIN, quat, client_id)[1]
        # Accelerometer: specific force a - g in the body frame, (v - v_last) / dt + (0, 0, g) in the world.
        (vx, vy, vz), (lx, ly, lz) = vel_world, self._last_vel_world
        accel_world = ((vx - lx) / dt + 0.0, (vy - ly) / dt + 0.0, (vz - lz) / dt + GRAVITY)
        self._last_vel_world = vel_world
        gyro = np.array(multiply(_ORIGIN, inverse, ang_world, _IDENTITY, client_id)[0])
        accel = np.array(multiply(_ORIGIN, inverse, accel_world, _IDENTITY, client_id)[0])
        if history is not None:
            inverse = pybullet.invertTransform(_ORIGIN, self._trunk_quat(quat_now), client_id)[1]
        base_vel = np.array(multiply(_ORIGIN, inverse, vel_now, _IDENTITY, client_id)[0])
        quat = np.array(quat)
        if self._joint_offsets is not None:
            q = q + self._joint_offsets
        if self._gyro_bias is not None:
            gyro = gyro + self._gyro_bias
        if self._noisy:
            q, dq, gyro, quat = add_sensor_noise(self.task, self.rng, q, dq, gyro, quat)
        return RobotState(
            joint_pos=q,
            joint_vel=dq,
            quat=quat,
            gyro=gyro,
            accel=accel,
            base_vel=base_vel,
            joint_torque=torque,
            command=np.asarray(command, dtype=np.float64),
            time=time,
            fallen=self.trunk_on_ground(),
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client = None
