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
    "kd_scale": (0.0, 5.0),
    "command_vx": (-3.0, 3.0),
}


@dataclass
class Task:
    """One environment setting. Defaults are the nominal robot on flat ground."""

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

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"task parameter '{name}' must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
            low, high = PARAMETER_BOUNDS[name]
            if (low is not None and value < low) or (high is not None and value > high):
                raise ConfigError(f"task parameter '{name}' = {value} is outside its physical range [{low}, {high}]")

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in dataclasses.asdict(self).items()}

    def vector(self) -> np.ndarray:
        """Task parameters as a float32 vector (privileged observation for oracle policies)."""
        return np.array(list(self.to_dict().values()), dtype=np.float32)

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

    def check(self, name: str) -> None:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ConfigError(f"range '{name}': give either non-empty 'choices' or 'low'/'high'")
            for value in self.choices:
                Task(**{name: value})
            return
        if self.low is None or self.high is None:
            raise ConfigError(f"range '{name}': needs 'low' and 'high' (or 'choices')")
        if self.low > self.high:
            raise ConfigError(f"range '{name}': low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"range '{name}': log-uniform needs low > 0")
        Task(**{name: self.low})
        Task(**{name: self.high})

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
        """The centre of every range."""
        return Task(**{name: r.centre() for name, r in self.ranges.items()})

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
