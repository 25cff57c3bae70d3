"""`metactl calibrate offsets`: joint zero offsets and gyro bias from a static recording.

The robot rests level in its calibration pose (the spec's default pose: on its stand or in its
start fixture) while State frames stream in. Then offset = mean(joint reading) - default pose,
gyro bias = mean(gyro reading) since a resting robot does not rotate, and the IMU mounting tilt is
the roll and pitch the IMU reports for a level body.
"""

from __future__ import annotations

import datetime
import time

import numpy as np
from tqdm import tqdm

from calibration.files import CalibrationFile
from controller.errors import ConfigError
from controller.mapping import roll_pitch
from controller.robot import RobotSpec
from deploy.errors import LinkError
from deploy.messages import Capability
from deploy.robot import RobotEnv

MAX_JOINT_STD = 0.01
"""rad: more spread than this means the robot moved during the recording."""


def record_static(env: RobotEnv, seconds: float, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw joint angles [N, n], gyro rates [N, 3] and IMU orientations [N, 4] over `seconds` of States."""
    if env.capabilities is not None and env.capabilities.flags & Capability.LOCKSTEP:
        raise LinkError("calibration needs a robot that streams State frames; this one runs in lockstep")
    joints, gyros, quats = [], [], []
    end = time.monotonic() + seconds
    expected = int(seconds * env.spec.control_rate_hz)
    with tqdm(total=expected, desc="recording", disable=not progress, leave=False, unit="state") as bar:
        while time.monotonic() < end:
            message = env.wait_state()
            joints.append(message.joint_pos.astype(np.float64))
            gyros.append(message.gyro.astype(np.float64))
            quats.append(message.quat.astype(np.float64))
            bar.update(1)
    return np.array(joints), np.array(gyros), np.array(quats)


def calibrate_offsets(
    url: str, spec: RobotSpec, *, seconds: float = 3.0, reset_wait: float | None = None, progress: bool = True
) -> CalibrationFile:
    env = RobotEnv(url, spec, reset_wait=reset_wait)
    try:
        capabilities = env.connect()
        if capabilities.robot != spec.name or list(capabilities.joint_names) != list(spec.joint_names):
            raise ConfigError(f"the robot on {url} is '{capabilities.robot}', not '{spec.name}' with its joint order")
        env.restart()  # back to the calibration pose (or the operator puts it there)
        joints, gyros, quats = record_static(env, seconds, progress)
    finally:
        env.close()
    if len(joints) < 10:
        raise LinkError(f"only {len(joints)} States arrived in {seconds} s; check the link with `metactl link`")
    spread = joints.std(axis=0).max()
    if spread > MAX_JOINT_STD:
        raise ConfigError(f"the robot moved during the recording (joint std {spread:.4f} rad > {MAX_JOINT_STD})")
    return CalibrationFile(
        robot=spec.name,
        joint_offsets=(joints.mean(axis=0) - spec.array("default_pose")).round(6).tolist(),
        gyro_bias=gyros.mean(axis=0).round(6).tolist(),
        # The robot rests level: whatever roll and pitch the IMU reports is how it is mounted.
        imu_tilt=[round(angle, 6) for angle in roll_pitch(quats.mean(axis=0) / np.linalg.norm(quats.mean(axis=0)))],
        recording={
            "samples": len(joints),
            "seconds": seconds,
            "port": url,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
