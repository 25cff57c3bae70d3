"""`metactl calibrate sysid`: fit simulator parameters to a recording of the robot.

The robot plays an excitation sequence (the trotting pattern plus a chirp on the thighs) from its
start pose; the same commands are replayed in PyBullet with candidate task parameters, and CMA-ES
minimizes the trajectory error. The spread of CMA-ES's final search distribution is reported as
the uncertainty of each identified value.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import numpy as np

from calibration.files import CalibrationFile
from controller.robot import RobotSpec
from deploy.messages import Command
from deploy.robot import RobotEnv
from sim.pybullet_robot import SimRobot
from sim.tasks import Task

logger = logging.getLogger(__name__)

# Parameter -> (low, high) search box; the defaults bracket the training ranges with margin.
SEARCH_RANGES: dict[str, tuple[float, float]] = {
    "added_mass": (-1.0, 8.0),
    "motor_strength": (0.5, 1.5),
    "friction": (0.1, 2.0),
    "kp_scale": (0.5, 1.5),
    "latency": (0.0, 0.04),
}


@dataclass
class Recording:
    """Commands sent and the readings that answered them, one row per control tick."""

    targets: np.ndarray  # [T, n]
    kp: np.ndarray  # [n]
    kd: np.ndarray  # [n]
    joint_pos: np.ndarray  # [T, n]
    joint_vel: np.ndarray  # [T, n]
    joint_torque: np.ndarray  # [T, n]
    base_vel: np.ndarray  # [T, 3]


def excitation(spec: RobotSpec, seconds: float) -> np.ndarray:
    """Joint targets [T, n]: slow squats and sways of growing frequency with all feet on the ground.

    Smooth and contact-stable, so two runs of the same robot stay close (a trot's foot impacts
    make trajectories diverge chaotically and the fit would chase noise). Assumes the
    hip/thigh/calf joint order per leg of the A1-class spec.
    """
    steps = int(seconds * spec.control_rate_hz)
    time = np.arange(steps) / spec.control_rate_hz
    # Phase of a slow chirp from 0.3 Hz to 1 Hz: 2 pi (f0 t + (f1 - f0) t^2 / (2 T)). Slow keeps the
    # error smooth in the parameters (faster motion excites contact chatter that is not).
    phase = 2 * np.pi * (0.3 * time + 0.7 * time**2 / (2 * max(seconds, 1e-6)))
    squat = 0.25 * np.sin(phase)
    sway = 0.1 * np.sin(0.5 * phase)
    targets = np.tile(spec.array("default_pose"), (steps, 1))
    targets[:, 1::3] += squat[:, None]
    targets[:, 2::3] -= 2.0 * squat[:, None]
    targets[:, 0::3] += sway[:, None]
    return np.clip(targets, spec.array("joint_lower"), spec.array("joint_upper"))


def record(env: RobotEnv, targets: np.ndarray) -> Recording:
    """Reset the robot, play `targets`, and keep the State that answers each Command."""
    state = env.restart()
    kp = np.full(env.spec.num_joints, env.spec.kp)
    kd = np.full(env.spec.num_joints, env.spec.kd)
    rows = {key: [] for key in ("joint_pos", "joint_vel", "joint_torque", "base_vel")}
    for target in targets:
        env.link.send(Command(state.tick, target + env.offsets, kp, kd))
        state = env.wait_state()
        reading = env.robot_state(state)
        for key in rows:
            rows[key].append(getattr(reading, key))
    return Recording(targets, kp, kd, **{key: np.array(value) for key, value in rows.items()})


def replay(sim: SimRobot, task: Task, recording: Recording) -> dict[str, np.ndarray]:
    sim.apply_task(task)
    sim.reset()
    dt = 1.0 / sim.spec.control_rate_hz
    rows = {key: [] for key in ("joint_pos", "joint_vel", "joint_torque", "base_vel")}
    for target in recording.targets:
        sim.step(target, recording.kp, recording.kd)
        reading = sim.read_state(np.zeros(3), dt)
        for key in rows:
            rows[key].append(getattr(reading, key))
    return {key: np.array(value) for key, value in rows.items()}


def _windowed(signal: np.ndarray, window: int) -> np.ndarray:
    """Means over consecutive windows [T // window, ...]."""
    usable = len(signal) // window * window
    return signal[:usable].reshape(usable // window, window, -1).mean(axis=1)


ERROR_SCALES = {"joint_pos": 0.01, "joint_torque": 0.5, "base_vel": 0.05}
"""Each signal's error is divided by its scale so the three weigh alike."""


def trajectory_error(recording: Recording, simulated: dict[str, np.ndarray], window: int = 10) -> float:
    """Mean squared error of 0.2 s window means, each signal scaled to comparable units.

    Contact dynamics make sample-by-sample errors jump with any parameter change; window means
    (the load a joint carries, the sag it shows) vary smoothly enough for the optimizer.
    """
    return float(
        sum(
            np.mean(((_windowed(getattr(recording, key), window) - _windowed(simulated[key], window)) / scale) ** 2)
            for key, scale in ERROR_SCALES.items()
        )
    )


def identify(
    spec: RobotSpec,
    recording: Recording,
    parameters: list[str],
    *,
    max_evaluations: int = 300,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, float], float]:
    """CMA-ES over the named parameters (normalized to [0, 1]); returns values, std devs, final error."""
    import cma
    from tqdm import tqdm

    unknown = [name for name in parameters if name not in SEARCH_RANGES]
    if unknown:
        raise ValueError(f"cannot identify {unknown}; identifiable: {', '.join(SEARCH_RANGES)}")
    low = np.array([SEARCH_RANGES[name][0] for name in parameters])
    high = np.array([SEARCH_RANGES[name][1] for name in parameters])
    sim = SimRobot(spec)

    def to_task(unit: np.ndarray) -> Task:
        values = low + np.clip(unit, 0.0, 1.0) * (high - low)
        return Task(**dict(zip(parameters, values.tolist())))

    def search(start: np.ndarray, sigma: float, evaluations: int, bar) -> cma.CMAEvolutionStrategy:
        options = {"bounds": [0.0, 1.0], "seed": seed + 1, "maxfevals": evaluations, "verbose": -9, "popsize": 10}
        strategy = cma.CMAEvolutionStrategy(start, sigma, options)
        while not strategy.stop():
            candidates = strategy.ask()
            errors = [trajectory_error(recording, replay(sim, to_task(x), recording)) for x in candidates]
            strategy.tell(candidates, errors)
            bar.update(len(candidates))
            bar.set_postfix(error=f"{min(errors):.4f}")
        return strategy

    # A global search over the whole box, then a local one around its best point.
    global_evaluations = int(0.7 * max_evaluations)
    with tqdm(total=max_evaluations, desc="sysid", disable=not progress, leave=False) as bar:
        first = search(np.full(len(parameters), 0.5), 0.25, global_evaluations, bar)
        strategy = search(np.clip(first.result.xbest, 0.0, 1.0), 0.03, max_evaluations - global_evaluations, bar)
    sim.close()
    if first.result.fbest < strategy.result.fbest:
        strategy = first
    best = np.clip(strategy.result.xbest, 0.0, 1.0)
    std_unit = strategy.sigma * np.sqrt(np.diag(strategy.C))
    values = low + best * (high - low)
    stds = std_unit * (high - low)
    return (
        dict(zip(parameters, values.round(4).tolist())),
        dict(zip(parameters, stds.round(4).tolist())),
        float(strategy.result.fbest),
    )


def calibrate_sysid(
    url: str,
    spec: RobotSpec,
    *,
    parameters: list[str] | None = None,
    seconds: float = 4.0,
    max_evaluations: int = 300,
    calibration: CalibrationFile | None = None,
    progress: bool = True,
) -> CalibrationFile:
    """Record an excitation on the robot and fit the simulator to it; merges into `calibration`."""
    parameters = parameters or ["added_mass", "motor_strength", "friction", "latency"]
    env = RobotEnv(url, spec, calibration=calibration.for_deploy() if calibration else None)
    try:
        capabilities = env.connect()
        if capabilities.robot != spec.name:
            raise ValueError(f"the robot on {url} is '{capabilities.robot}', not '{spec.name}'")
        recording = record(env, excitation(spec, seconds))
    finally:
        env.close()
    values, stds, error = identify(spec, recording, parameters, max_evaluations=max_evaluations, progress=progress)
    result = calibration or CalibrationFile(robot=spec.name)
    result.identified = values
    result.uncertainty = stds
    result.recording = {
        **result.recording,
        "sysid_seconds": seconds,
        "sysid_evaluations": max_evaluations,
        "sysid_error": round(error, 6),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return result
