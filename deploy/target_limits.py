"""Where a Command's joint targets may go: the clamp behind `RobotEnv.safe_targets`.

Targets travel in the robot's encoder frame (the spec's frame + the calibration's joint offsets), so
the joint limits are shifted by the offsets here once.
"""

from __future__ import annotations

import numpy as np

from controller.robot import RobotSpec
from deploy.messages import State
from deploy.robot_states import RobotHealth


class TargetLimits:
    """The rate, torque-reach and joint limits of one robot's targets, counting what they change.

    Args:
        spec: The robot spec (joint and torque limits, kp, default pose).
        offsets: Joint offsets (n,): encoder angle = spec angle + offset.
        max_target_step: Largest change of any joint target per control tick (rad).
        health: The RobotEnv's counters (non-finite and rate-limited targets).
    """

    def __init__(self, spec: RobotSpec, offsets: np.ndarray, max_target_step: float, health: RobotHealth) -> None:
        self.num_joints = spec.num_joints
        self.max_target_step = max_target_step
        self.health = health
        # Furthest a target may sit from the measured angle before kp alone exceeds the torque limit.
        self.torque_reach = spec.array("torque_limit") / max(spec.kp, 1e-9)
        # Joint limits and default pose in the robot's encoder frame, where targets travel.
        self.lower = spec.array("joint_lower") + offsets
        self.upper = spec.array("joint_upper") + offsets
        self.default = spec.array("default_pose") + offsets

    def clamp(self, targets: np.ndarray, previous: np.ndarray, last: State | None) -> np.ndarray:
        """Joint targets (n,) in the robot's encoder frame -> what may go to the motors (n,).

        1. a non-finite entry holds the previous target (NaN or inf never reaches a motor);
        2. |target - previous| <= max_target_step per joint (rate limit);
        3. |target - measured| <= torque_limit / kp (the PD's position term cannot ask for more than
           the motor's torque limit; the robot clamps torque too);
        4. lower + offset <= target <= upper + offset (joint limits, encoder frame).

        Args:
            targets: The targets asked for (n,).
            previous: The previous targets (n,), finite: the last ones sent, or the measured pose
                after a reset or reconnect (`hold_measured`).
            last: The last State used (its measured angles), or None before the first.
        """
        targets = np.array(targets, dtype=np.float64).reshape(self.num_joints)
        bad = ~np.isfinite(targets)
        if bad.any():
            self.health.nonfinite_targets += 1
            targets[bad] = previous[bad]
        limited = np.clip(targets, previous - self.max_target_step, previous + self.max_target_step)
        if np.any(limited != targets):
            self.health.rate_limited += 1
        if last is not None:
            measured = last.joint_pos.astype(np.float64)
            reach = self.torque_reach
            ok = np.isfinite(measured)
            limited[ok] = np.clip(limited[ok], measured[ok] - reach[ok], measured[ok] + reach[ok])
        return np.clip(limited, self.lower, self.upper)

    def hold_measured(self, message: State) -> np.ndarray:
        """A rate-limit reference at the measured pose (finite entries; the default pose elsewhere)."""
        measured = message.joint_pos.astype(np.float64)
        return np.clip(np.where(np.isfinite(measured), measured, self.default), self.lower, self.upper)
