"""The PyBullet world of one `SimRobot`: the robot loaded on its ground, and what changes only between episodes.

`RobotWorld` connects a private client, loads the ground and the robot, reads what the URDF fixes (joint ids,
masses, the spawn pose) and keeps the saved spawn state that a reset restores. It also makes the task edits that
live in the world's dynamics rather than in the per-step loop: terrain, ground contact and masses.
`SimRobot.apply_task` calls these in order; none runs in `SimRobot.step` or `SimRobot.read_state`.
"""

from __future__ import annotations

import pybullet
import pybullet_data
from pybullet_utils import bullet_client

from controller.robot import RobotSpec
from sim.tasks import Task
from sim.terrain import Ground, TerrainParams

GRAVITY = 9.81
ROBOT_RESTITUTION = 1.0
"""Bullet multiplies the two bodies' restitutions (and the robot's friction 1.0 scales the ground's rolling
and spinning friction), so with the robot's set to 1 the ground's value is the contact's value."""


class RobotWorld:
    """One robot on a plane (or terrain) in a private PyBullet client (DIRECT unless `gui`), standing at its spawn.

    Args:
        spec: the robot.
        gui: open PyBullet's window.
    """

    def __init__(self, spec: RobotSpec, *, gui: bool = False) -> None:
        self.client = client = bullet_client.BulletClient(connection_mode=pybullet.GUI if gui else pybullet.DIRECT)
        # Per-step calls go to pybullet's module functions with this id passed positionally: BulletClient looks a
        # function up and wraps it on every call (~2 us), a keyword argument costs ~0.5 us more.
        self.client_id = client._client
        client.setAdditionalSearchPath(pybullet_data.getDataPath())
        client.setGravity(0, 0, -GRAVITY)
        client.setTimeStep(spec.sim_timestep)
        # Same contact order after restoreState, so a reset episode repeats exactly (resume, evaluation).
        client.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
        self.ground = client.loadURDF("plane.urdf")
        self.terrain = Ground(client, self.ground)
        rpy = list(spec.base_orientation_rpy)
        base_rotation = client.getQuaternionFromEuler(rpy)
        # Trunk frame = URDF base frame * inverse(base rotation); None when they coincide.
        self.to_trunk = None if not any(rpy) else client.invertTransform([0, 0, 0], base_rotation)[1]
        self.body = client.loadURDF(spec.urdf, [0, 0, spec.base_height], base_rotation, useFixedBase=False)
        # The base pose PyBullet reports and resets is its centre-of-mass frame: keep the spawn one to re-spawn.
        self._spawn_pose = client.getBasePositionAndOrientation(self.body)
        num_links = client.getNumJoints(self.body)
        names = {client.getJointInfo(self.body, j)[1].decode(): j for j in range(num_links)}
        missing = [name for name in spec.joint_names if name not in names]
        if missing:
            raise ValueError(f"robot '{spec.name}': joints {missing} not in {spec.urdf}")
        self.joint_ids = [names[name] for name in spec.joint_names]
        self._movable = [j for j in range(num_links) if client.getJointInfo(self.body, j)[2] != pybullet.JOINT_FIXED]
        self.base_mass = client.getDynamicsInfo(self.body, -1)[0]
        self._link_dynamics = [client.getDynamicsInfo(self.body, link)[:3] for link in range(num_links)]
        self._link_mass_scale = 1.0
        for link in range(-1, num_links):
            client.changeDynamics(self.body, link, lateralFriction=1.0, restitution=ROBOT_RESTITUTION)
        # Torque control needs PyBullet's default velocity motors switched off.
        client.setJointMotorControlArray(
            self.body, self.joint_ids, pybullet.VELOCITY_CONTROL, forces=[0.0] * spec.num_joints
        )
        self.default_pose = spec.array("default_pose")
        for joint, angle in zip(self.joint_ids, self.default_pose):
            client.resetJointState(self.body, joint, angle)
        self.initial_state = client.saveState()

    def set_ground(self, task: Task) -> list[int]:
        """Build the task's terrain and set its contact; returns the ground bodies.

        A saved state is tied to the bodies that existed, so a terrain change re-saves the spawn state.
        """
        client = self.client
        if self.terrain.build(TerrainParams.from_task(task)):
            self._save_spawn_state()
        grounds = self.terrain.bodies
        for ground in grounds:
            client.changeDynamics(
                ground,
                -1,
                lateralFriction=task.friction,
                spinningFriction=task.spinning_friction,
                rollingFriction=task.rolling_friction,
                restitution=task.restitution,
            )
        return grounds

    def set_masses(self, task: Task) -> None:
        """Base mass plus `added_mass`; every link's mass and inertia times `link_mass_scale`.

        Dynamics edits survive restoreState, so the link masses (many calls) are only re-sent when the scale changes.
        """
        client, body = self.client, self.body
        client.changeDynamics(body, -1, mass=self.base_mass + task.added_mass)
        if task.link_mass_scale != self._link_mass_scale:
            for link, (mass, _, inertia) in enumerate(self._link_dynamics):
                scale = task.link_mass_scale
                client.changeDynamics(body, link, mass=mass * scale, localInertiaDiagonal=[i * scale for i in inertia])
            self._link_mass_scale = task.link_mass_scale

    def _save_spawn_state(self) -> None:
        """Save the spawn state (above the current ground) as the reset state; the robot keeps its current state."""
        client, body = self.client, self.body
        position, orientation = client.getBasePositionAndOrientation(body)
        velocity = client.getBaseVelocity(body)
        joints = client.getJointStates(body, self._movable)
        spawn, spawn_orientation = self._spawn_pose
        spawn = [spawn[0], spawn[1], spawn[2] + self.terrain.spawn_height()]
        client.resetBasePositionAndOrientation(body, spawn, spawn_orientation)
        client.resetBaseVelocity(body, [0, 0, 0], [0, 0, 0])
        default = dict(zip(self.joint_ids, self.default_pose))
        for joint in self._movable:
            client.resetJointState(body, joint, default.get(joint, 0.0), 0.0)
        client.removeState(self.initial_state)
        self.initial_state = client.saveState()
        client.resetBasePositionAndOrientation(body, position, orientation)
        client.resetBaseVelocity(body, *velocity)
        for joint, state in zip(self._movable, joints):
            client.resetJointState(body, joint, state[0], state[1])
