"""What a `Task` adds to the simulated sensors: per-episode errors and per-reading noise.

Joint encoder offsets and a gyro bias are drawn once per episode (and when the task's error scales change) and
held; Gaussian noise on joint positions, joint velocities, the gyro and the reported gravity direction is drawn at
every reading. Both draw from the robot's generator, in the order written here, so a seeded reset repeats them.
`SimRobot.read_state` adds noise only on a task with a noise scale above zero.
"""

from __future__ import annotations

import math

import numpy as np

from controller.mapping import quat_multiply
from sim.tasks import Task


def draw_sensor_errors(
    task: Task, rng: np.random.Generator, num_joints: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Joint encoder offsets (num_joints,) and gyro bias (3,), each None when its task scale is 0."""
    joint_offsets = rng.normal(0.0, task.joint_offset, num_joints) if task.joint_offset > 0 else None
    gyro_bias = rng.normal(0.0, task.gyro_bias, 3) if task.gyro_bias > 0 else None
    return joint_offsets, gyro_bias


def add_sensor_noise(
    task: Task, rng: np.random.Generator, q: np.ndarray, dq: np.ndarray, gyro: np.ndarray, quat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The readings (q, dq: (num_joints,); gyro: (3,); quat: (4,) x, y, z, w) with the task's noise added."""
    num_joints = len(q)
    if task.noise_joint_pos > 0:
        q = q + rng.normal(0.0, task.noise_joint_pos, num_joints)
    if task.noise_joint_vel > 0:
        dq = dq + rng.normal(0.0, task.noise_joint_vel, num_joints)
    if task.noise_gyro > 0:
        gyro = gyro + rng.normal(0.0, task.noise_gyro, 3)
    if task.noise_gravity > 0:
        # A small random roll and pitch of the reported orientation (rotation vector (a, b, 0) in the body).
        roll, pitch = rng.normal(0.0, task.noise_gravity, 2)
        angle = math.hypot(roll, pitch)
        half = 0.5 * angle
        scale = math.sin(half) / angle if angle > 0 else 0.5
        quat = quat_multiply(quat, (roll * scale, pitch * scale, 0.0, math.cos(half)))
    return q, dq, gyro, quat
