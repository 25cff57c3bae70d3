"""A robot in its own PyBullet world: loading, task dynamics, PD motors, state readout.

Shared by the Gymnasium env and the emulator, so both step the same physics. PD torques are
computed here at the physics rate (not by PyBullet's position motors) so that motor strength,
gain scales and damping mode act on the torque, as on the real robot.
"""

from __future__ import annotations

import numpy as np
import pybullet
import pybullet_data
from pybullet_utils import bullet_client

from controller.mapping import RobotState
from controller.robot import RobotSpec
from sim.tasks import Task

GRAVITY = 9.81


class SimRobot:
    """One robot on a plane in a private PyBullet client (DIRECT unless `gui`)."""

    def __init__(self, spec: RobotSpec, *, gui: bool = False) -> None:
        self.spec = spec
        self.client = bullet_client.BulletClient(connection_mode=pybullet.GUI if gui else pybullet.DIRECT)
        client = self.client
        client.setAdditionalSearchPath(pybullet_data.getDataPath())
        client.setGravity(0, 0, -GRAVITY)
        client.setTimeStep(spec.sim_timestep)
        self.ground = client.loadURDF("plane.urdf")
        self.body = client.loadURDF(spec.urdf, [0, 0, spec.base_height], useFixedBase=False)
        names = {client.getJointInfo(self.body, j)[1].decode(): j for j in range(client.getNumJoints(self.body))}
        missing = [name for name in spec.joint_names if name not in names]
        if missing:
            raise ValueError(f"robot '{spec.name}': joints {missing} not in {spec.urdf}")
        self.joint_ids = [names[name] for name in spec.joint_names]
        self.base_mass = client.getDynamicsInfo(self.body, -1)[0]
        for link in range(-1, client.getNumJoints(self.body)):
            client.changeDynamics(self.body, link, lateralFriction=1.0)
        # Torque control needs PyBullet's default velocity motors switched off.
        client.setJointMotorControlArray(
            self.body, self.joint_ids, pybullet.VELOCITY_CONTROL, forces=[0.0] * spec.num_joints
        )
        self._default = spec.array("default_pose")
        self._torque_limit = spec.array("torque_limit")
        for joint, angle in zip(self.joint_ids, self._default):
            client.resetJointState(self.body, joint, angle)
        self._initial_state = client.saveState()
        self.task = Task()
        self.apply_task(self.task)
        self.last_torque = np.zeros(spec.num_joints)
        self._last_vel_world = np.zeros(3)
        self.sim_time = 0.0

    def apply_task(self, task: Task) -> None:
        """Set every task-dependent dynamics value explicitly (restoreState keeps old edits)."""
        self.task = task
        self.client.changeDynamics(self.ground, -1, lateralFriction=task.friction)
        self.client.changeDynamics(self.body, -1, mass=self.base_mass + task.added_mass)

    def reset(self, rng: np.random.Generator | None = None, joint_noise: float = 0.0) -> None:
        """Back to the standing pose via a saved state (no reload), with optional joint noise."""
        self.client.restoreState(self._initial_state)
        if rng is not None and joint_noise > 0:
            noise = rng.uniform(-joint_noise, joint_noise, self.spec.num_joints)
            for joint, angle in zip(self.joint_ids, self._default + noise):
                self.client.resetJointState(self.body, joint, angle)
        self.apply_task(self.task)
        self.last_torque = np.zeros(self.spec.num_joints)
        self._last_vel_world = np.zeros(3)
        self.sim_time = 0.0

    def joint_states(self) -> tuple[np.ndarray, np.ndarray]:
        states = self.client.getJointStates(self.body, self.joint_ids)
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def step(
        self, targets: np.ndarray, kp: np.ndarray | float, kd: np.ndarray | float, substeps: int | None = None
    ) -> None:
        """Run `substeps` physics steps (default: one control period) of PD torque control.

        tau = strength * clip(kp_scale kp (q* - q) - kd_scale kd dq, -limit, limit)
        """
        task = self.task
        kp_eff = np.asarray(kp) * task.kp_scale
        kd_eff = np.asarray(kd) * task.kd_scale
        for _ in range(self.spec.decimation if substeps is None else substeps):
            q, dq = self.joint_states()
            torque = task.motor_strength * np.clip(
                kp_eff * (targets - q) - kd_eff * dq, -self._torque_limit, self._torque_limit
            )
            self.client.setJointMotorControlArray(self.body, self.joint_ids, pybullet.TORQUE_CONTROL, forces=torque)
            self.client.stepSimulation()
            self.sim_time += self.spec.sim_timestep
        self.last_torque = torque

    def base_position(self) -> np.ndarray:
        return np.asarray(self.client.getBasePositionAndOrientation(self.body)[0])

    def trunk_on_ground(self) -> bool:
        return bool(self.client.getContactPoints(self.body, self.ground, -1, -1))

    def read_state(self, command: np.ndarray, dt: float) -> RobotState:
        """The robot's sensors (plus the simulator-only base velocity), all in the body frame."""
        client = self.client
        _, quat = client.getBasePositionAndOrientation(self.body)
        vel_world, ang_world = client.getBaseVelocity(self.body)
        quat = np.asarray(quat)
        inverse = client.invertTransform([0, 0, 0], quat)[1]

        def to_body(vector: np.ndarray) -> np.ndarray:
            return np.asarray(client.multiplyTransforms([0, 0, 0], inverse, vector, [0, 0, 0, 1])[0])

        vel_world = np.asarray(vel_world)
        # Accelerometer: specific force a - g in the body frame.
        accel_world = (vel_world - self._last_vel_world) / dt + np.array([0.0, 0.0, GRAVITY])
        self._last_vel_world = vel_world
        q, dq = self.joint_states()
        return RobotState(
            joint_pos=q,
            joint_vel=dq,
            quat=quat,
            gyro=to_body(ang_world),
            accel=to_body(accel_world),
            base_vel=to_body(vel_world),
            joint_torque=self.last_torque.copy(),
            command=np.asarray(command, dtype=np.float64),
            time=self.sim_time,
            fallen=self.trunk_on_ground(),
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client = None
