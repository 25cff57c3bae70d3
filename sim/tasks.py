"""Tasks and task distributions: randomization lives here, nowhere else.

A `Task` is one setting of the dynamics (and the command the robot is asked to follow). A
`TaskDistribution` is built from YAML ranges and samples tasks with an explicit
`numpy.random.Generator`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from controller.config import build, load_yaml, to_dict
from controller.errors import ConfigError

# Physical bounds of each task parameter: (low, high); None means unbounded.
PARAMETER_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "friction": (0.0, None),
    "added_mass": (-2.0, 20.0),
    "motor_strength": (0.05, 3.0),
    "kp_scale": (0.05, 5.0),
    "kd_scale": (0.0, 1.5),  # explicit PD at 200 Hz oscillates above ~1.5x kd
    "command_vx": (-3.0, 3.0),
    "link_mass_scale": (0.25, 4.0),
    "payload_com_x": (-0.2, 0.2),
    "payload_com_y": (-0.2, 0.2),
    "spinning_friction": (0.0, 1.0),
    "rolling_friction": (0.0, 1.0),
    "restitution": (0.0, 1.0),
    "motor_strength_spread": (0.0, 0.5),
    "latency": (0.0, 0.04),
    "control_jitter": (0.0, 0.01),
    "joint_damping": (0.0, 5.0),
    "joint_coulomb": (0.0, 10.0),
    "noise_joint_pos": (0.0, 0.1),
    "noise_joint_vel": (0.0, 5.0),
    "noise_gyro": (0.0, 1.0),
    "noise_gravity": (0.0, 0.2),
    "joint_offset": (0.0, 0.2),
    "gyro_bias": (0.0, 0.5),
    "push_interval_s": (0.0, 60.0),
    "push_velocity": (0.0, 3.0),
    "terrain": (0.0, 3.0),
    "terrain_amplitude": (0.0, 0.3),
    "terrain_feature": (0.1, 5.0),
    "slope": (-0.6, 0.6),
    "step_height": (0.0, 0.25),
    "seed": (0.0, 2.0**32 - 1),
}

TERRAIN_KINDS = {0: "flat", 1: "rough", 2: "slope", 3: "stairs"}
"""Values of `Task.terrain`."""

# Parameters that are categories or integers rather than quantities.
CATEGORICAL_PARAMETERS = ("terrain",)
NOT_IN_VECTOR = ("seed",)
"""Left out of `Task.vector()`: a seed is an identity, not a quantity a policy can use."""


@dataclass
class Task:
    """One environment setting. Defaults are the nominal robot on flat ground.

    Fields after `command_vx` were added later; each defaults to the value that leaves the nominal
    simulation exactly as it was, so old task files load and behave unchanged. `sim.pybullet_robot.SimRobot.
    apply_task` is the one place where every field takes effect.
    """

    friction: float = 1.0
    """Ground lateral friction coefficient."""
    added_mass: float = 0.0
    """Payload added to the base link (kg)."""
    motor_strength: float = 1.0
    """Scale on every motor's torque and torque limit."""
    kp_scale: float = 1.0
    """Scale on the PD position gain the robot applies."""
    kd_scale: float = 1.0
    """Scale on the PD velocity gain the robot applies."""
    command_vx: float = 0.5
    """Forward velocity command (m/s)."""
    link_mass_scale: float = 1.0
    """Scale on the mass and rotational inertia of every link except the base."""
    payload_com_x: float = 0.0
    """Forward shift (m) of the base's centre of mass (trunk plus payload), in the trunk frame. Modelled as the
    base's weight acting at the shifted point (PyBullet cannot move a link's inertial frame)."""
    payload_com_y: float = 0.0
    """Leftward shift (m) of the base's centre of mass, in the trunk frame."""
    spinning_friction: float = 0.0
    """Ground torsional friction (Bullet's spinning friction: resists a foot twisting about the normal)."""
    rolling_friction: float = 0.0
    """Ground rolling friction (Bullet's rolling friction: resists a round foot rolling)."""
    restitution: float = 0.0
    """Ground coefficient of restitution (0 plastic, 1 elastic; Bullet applies it above ~0.2 m/s)."""
    motor_strength_spread: float = 0.0
    """Per-joint strength variation: joint j gets motor_strength * (1 + spread * u_j), u_j ~ U(-1, 1) from `seed`."""
    latency: float = 0.0
    """Actuation and sensing delay (s): a command acts, and a reading arrives, round(latency / sim_timestep)
    physics steps late."""
    control_jitter: float = 0.0
    """Standard deviation (s) of the control period: each control step runs decimation + round(N(0, (jitter /
    sim_timestep)^2)) physics steps (at least one)."""
    joint_damping: float = 0.0
    """Joint viscous friction (N m s / rad): opposes motion with up to joint_damping * |dq| each physics step,
    through the solver, so it can slow a joint but never reverse it."""
    joint_coulomb: float = 0.0
    """Joint Coulomb (dry) friction (N m): up to this torque opposes joint motion, and holds a joint at rest."""
    noise_joint_pos: float = 0.0
    """Standard deviation (rad) of white noise on each joint angle reading."""
    noise_joint_vel: float = 0.0
    """Standard deviation (rad/s) of white noise on each joint velocity reading."""
    noise_gyro: float = 0.0
    """Standard deviation (rad/s) of white noise on each gyro axis."""
    noise_gravity: float = 0.0
    """Standard deviation (rad) of a random roll and pitch on the reported orientation, so each horizontal
    component of the observed gravity direction gets noise of about this size."""
    joint_offset: float = 0.0
    """Standard deviation (rad) of the encoder zero offsets drawn at each reset (reading = true + offset; the
    motor's PD loop runs on the offset reading, as on the robot)."""
    gyro_bias: float = 0.0
    """Standard deviation (rad/s) of the gyro bias drawn per axis at each reset (reading = true + bias)."""
    push_interval_s: float = 0.0
    """Seconds between random pushes; 0 disables pushing."""
    push_velocity: float = 0.0
    """Speed (m/s) a push adds to the base, horizontally, in a random direction."""
    terrain: float = 0.0
    """Ground kind: 0 flat, 1 rough heightfield, 2 slope, 3 stairs (see sim/terrain.py)."""
    terrain_amplitude: float = 0.0
    """Rough terrain: heights drawn uniformly in [0, amplitude] (m)."""
    terrain_feature: float = 0.3
    """Rough terrain: spacing (m) of the random height grid (bump size); stairs: tread depth (m)."""
    slope: float = 0.0
    """Slope terrain: incline (rad) about the y axis, uphill towards +x."""
    step_height: float = 0.0
    """Stairs terrain: riser height (m)."""
    seed: float = 0.0
    """Seeds the terrain heights and the per-joint strength pattern; rounded down to an integer."""

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"task parameter '{name}' must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
            low, high = PARAMETER_BOUNDS[name]
            if (low is not None and value < low) or (high is not None and value > high):
                raise ConfigError(f"task parameter '{name}' = {value} is outside its physical range [{low}, {high}]")
        if self.terrain not in TERRAIN_KINDS:
            kinds = ", ".join(f"{key} ({kind})" for key, kind in TERRAIN_KINDS.items())
            raise ConfigError(f"task parameter 'terrain' = {self.terrain} must be one of {kinds}")
        object.__setattr__(self, "seed", float(math.floor(self.seed)))

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in dataclasses.asdict(self).items()}

    def vector(self) -> np.ndarray:
        """Task parameters as a float32 vector (privileged observation for oracle policies).

        Field order, without `seed`; the first six entries are the original parameters, in their original order.
        """
        return np.array([value for key, value in self.to_dict().items() if key not in NOT_IN_VECTOR], dtype=np.float32)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Task:
        return build(cls, data or {}, "task")


def save_task(task: Task, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(task.to_dict(), sort_keys=False))


def load_task(path: str | Path) -> Task:
    return Task.from_dict(load_yaml(path))


@dataclass
class ParameterRange:
    """How one task parameter is drawn: uniform, log-uniform or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    """Draw uniformly in log space (both bounds > 0)."""
    choices: list[float] | None = None

    def check(self, name: str, task_type: type = Task, where: str | None = None) -> None:
        """Every value the range can produce must make a valid `task_type` (errors name `where`, default `name`)."""
        where = where or name
        if task_type is Task and name in CATEGORICAL_PARAMETERS and self.choices is None:
            raise ConfigError(f"range '{where}': a category, give 'choices' (e.g. [0, 1, 3]), not 'low'/'high'")
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ConfigError(f"range '{where}': give either non-empty 'choices' or 'low'/'high'")
            values = list(self.choices)
        else:
            if self.low is None or self.high is None:
                raise ConfigError(f"range '{where}': needs 'low' and 'high' (or 'choices')")
            if self.low > self.high:
                raise ConfigError(f"range '{where}': low {self.low} > high {self.high}")
            if self.log and self.low <= 0:
                raise ConfigError(f"range '{where}': log-uniform needs low > 0, got {self.low}")
            values = [self.low, self.high]
        for value in values:
            try:
                task_type(**{name: value})
            except ConfigError as error:
                raise ConfigError(f"range '{where}': {error}") from None

    def sample(self, rng: np.random.Generator) -> float:
        if self.choices is not None:
            return float(self.choices[rng.integers(len(self.choices))])
        if self.log:
            return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def centre(self) -> float:
        if self.choices is not None:
            return float(np.mean(self.choices))
        return float(np.sqrt(self.low * self.high) if self.log else 0.5 * (self.low + self.high))


@dataclass
class TaskDistribution:
    """Ranges over task parameters; parameters not named stay at the nominal Task value."""

    ranges: dict[str, ParameterRange] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "tasks") -> TaskDistribution:
        ranges = {}
        valid = [f.name for f in dataclasses.fields(Task)]
        for name, spec in (data or {}).items():
            if name not in valid:
                raise ConfigError(f"unknown task parameter '{where}.{name}'; valid: {', '.join(valid)}")
            if isinstance(spec, (int, float)):
                spec = {"choices": [spec]}
            elif isinstance(spec, list):
                spec = {"choices": spec}
            ranges[name] = build(ParameterRange, spec, f"{where}.{name}")
            ranges[name].check(name)
        return cls(ranges)

    def to_dict(self) -> dict[str, Any]:
        # `is not` so that a 0.0 bound (== False) survives.
        return {
            name: {k: v for k, v in to_dict(r).items() if v is not None and v is not False}
            for name, r in self.ranges.items()
        }

    def sample_tasks(self, num_tasks: int, rng: np.random.Generator) -> list[Task]:
        """Draw `num_tasks` tasks; parameters are drawn in a fixed order so a seed fixes the tasks."""
        return [Task(**{name: r.sample(rng) for name, r in self.ranges.items()}) for _ in range(num_tasks)]

    def nominal(self) -> Task:
        """The centre of every range (a category's first choice: terrain kinds have no mean)."""
        return Task(
            **{name: r.choices[0] if name in CATEGORICAL_PARAMETERS else r.centre() for name, r in self.ranges.items()}
        )

    def recentred(self, values: Mapping[str, float]) -> TaskDistribution:
        """Shift each named range so its centre is the given (identified) value, keeping its width."""
        ranges = dict(self.ranges)
        valid = [f.name for f in dataclasses.fields(Task)]
        for name, value in values.items():
            if name not in valid:
                raise ConfigError(f"cannot re-centre unknown task parameter '{name}'; valid: {', '.join(valid)}")
            if name not in ranges:
                new = ParameterRange(choices=[float(value)])
                new.check(name)
                ranges[name] = new
                continue
            old = ranges[name]
            if old.choices is not None:
                new = ParameterRange(choices=[float(value)])
            elif old.log:
                ratio = np.sqrt(old.high / old.low)
                new = ParameterRange(low=value / ratio, high=value * ratio, log=True)
            else:
                half = 0.5 * (old.high - old.low)
                new = ParameterRange(low=value - half, high=value + half)
            new.check(name)
            ranges[name] = new
        return TaskDistribution(ranges)
