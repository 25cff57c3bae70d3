"""Simulation throughput: raw PyBullet vs `LocomotionEnv`, and sampler scaling (process, Ray).

    python benchmarks/sim_throughput.py [--quick] [--json] [--profile] [--bound] [--ray-address ADDR]

Measures, in one run, control steps per second (one control step = `decimation` physics steps):

    raw        the physics work of `SimRobot.step` alone (getJointStates, PD torque,
               setJointMotorControlArray(TORQUE_CONTROL), stepSimulation per substep) on plain
               pybullet calls written as cheaply as `SimRobot.step` writes them, replaying the
               env's own joint targets and resets
    env        `LocomotionEnv.step` with random actions, same robot, same resets
    inline-1   sampler, backend inline, 1 copy (the sampler's cost without IPC)
    process-N  sampler, backend process, N = 1 and 2 worker processes (env steps/s, all copies)
    ray-2      sampler, backend ray, 2 actors

Ratios: env_vs_raw = env / raw (target >= 0.9), process_scaling = process-2 / process-1 (target
>= 1.7 on 2 idle cores), ray_vs_process = ray-2 / process-2. Each number is the best of a few
rounds, so a busy machine biases it less; env_vs_raw_cpu compares the process CPU time per step of
the same rounds, which other processes on the cores disturb less than wall time. `--bound` adds
`bound_env_vs_raw_cpu`: that ratio with the joint targets, then also the observation, then also
the reward replaced by precomputed results (same physics). Prints a Markdown
table, then the JSON object as the last line (`--json`: the JSON line alone).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import sys
import time
from typing import Any

import numpy as np
import pybullet
import pybullet_data

from controller.mapping import ObservationMapping
from controller.robot import RobotSpec, load_robot_spec
from sim.env import LocomotionEnv
from sim.samplers import make_vector_env

ROBOT = "a1"
TARGETS = {"env_vs_raw": 0.9, "process_scaling": 1.7}


class RawRobot:
    """The robot set up as `SimRobot` does it, stepped with plain pybullet calls and no wrappers."""

    def __init__(self, spec: RobotSpec) -> None:
        self.cid = cid = pybullet.connect(pybullet.DIRECT)
        pybullet.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
        pybullet.setGravity(0, 0, -9.81, physicsClientId=cid)
        pybullet.setTimeStep(spec.sim_timestep, physicsClientId=cid)
        pybullet.setPhysicsEngineParameter(deterministicOverlappingPairs=1, physicsClientId=cid)
        ground = pybullet.loadURDF("plane.urdf", physicsClientId=cid)
        self.body = pybullet.loadURDF(spec.urdf, [0, 0, spec.base_height], useFixedBase=False, physicsClientId=cid)
        num_joints = pybullet.getNumJoints(self.body, physicsClientId=cid)
        names = {pybullet.getJointInfo(self.body, j, physicsClientId=cid)[1].decode(): j for j in range(num_joints)}
        self.joint_ids = [names[name] for name in spec.joint_names]
        pybullet.changeDynamics(ground, -1, lateralFriction=1.0, physicsClientId=cid)
        for link in range(-1, num_joints):
            pybullet.changeDynamics(self.body, link, lateralFriction=1.0, physicsClientId=cid)
        pybullet.setJointMotorControlArray(
            self.body, self.joint_ids, pybullet.VELOCITY_CONTROL, forces=[0.0] * spec.num_joints, physicsClientId=cid
        )
        for joint, angle in zip(self.joint_ids, spec.default_pose):
            pybullet.resetJointState(self.body, joint, angle, physicsClientId=cid)
        self.initial_state = pybullet.saveState(physicsClientId=cid)
        self.kp, self.kd = spec.kp, spec.kd
        self.limit = spec.array("torque_limit")
        self.decimation = spec.decimation

    def run(self, targets: np.ndarray, resets: np.ndarray) -> tuple[float, float]:
        """Replay `targets` (steps, num_joints), restoring the initial state before each flagged step.

        Each substep does what `SimRobot.step` does at nominal dynamics, written the cheapest way we know (the
        same PD law on Python floats as there), so the ratio measures the env's overhead, not a slower loop.
        Returns wall seconds and this process's CPU seconds.
        """
        body, joints, cid = self.body, self.joint_ids, self.cid
        lows, highs = (-self.limit).tolist(), self.limit.tolist()
        kp, kd, torque_mode, decimation = self.kp, self.kd, pybullet.TORQUE_CONTROL, self.decimation
        get_joint_states, set_motors, step_simulation = (
            pybullet.getJointStates,
            pybullet.setJointMotorControlArray,
            pybullet.stepSimulation,
        )
        pybullet.restoreState(self.initial_state, physicsClientId=cid)
        start, start_cpu = time.perf_counter(), time.process_time()
        for target, reset in zip(targets, resets):
            if reset:
                pybullet.restoreState(self.initial_state, physicsClientId=cid)
            law = list(zip(target.tolist(), lows, highs))
            for _ in range(decimation):
                torque = []
                for (goal, low, high), joint in zip(law, get_joint_states(body, joints, cid)):
                    value = kp * (goal - joint[0]) - kd * joint[1]
                    value = low if value < low else value
                    torque.append(high if value > high else value)
                set_motors(body, joints, torque_mode, forces=torque, physicsClientId=cid)
                step_simulation(cid)
        return time.perf_counter() - start, time.process_time() - start_cpu

    def joint_positions(self) -> np.ndarray:
        return np.array([s[0] for s in pybullet.getJointStates(self.body, self.joint_ids, physicsClientId=self.cid)])

    def close(self) -> None:
        pybullet.disconnect(physicsClientId=self.cid)


def run_env(env: LocomotionEnv, actions: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Step with `actions` (steps, act_dim), resetting when done.

    Returns wall seconds, this process's CPU seconds, and the steps preceded by a reset.
    """
    env.reset(seed=0)
    resets = np.zeros(len(actions), bool)
    start, start_cpu = time.perf_counter(), time.process_time()
    for index, action in enumerate(actions):
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
            if index + 1 < len(actions):
                resets[index + 1] = True
    return time.perf_counter() - start, time.process_time() - start_cpu, resets


def replay_targets(spec: RobotSpec, actions: np.ndarray, resets: np.ndarray) -> np.ndarray:
    """The joint targets the env computed for `actions` (the mapping restarts its gait at each reset)."""
    mapping = ObservationMapping(spec)
    targets = []
    for action, reset in zip(actions, resets):
        if reset:
            mapping.reset()
        targets.append(mapping.targets(action))
    return np.array(targets)


def check_same_physics(spec: RobotSpec, actions: np.ndarray) -> bool:
    """Whether the raw loop really replays the env's physics: a fresh env and a fresh raw robot
    (same contact history) must end in bit-identical joint positions."""
    env, raw = LocomotionEnv(spec, joint_noise=0.0), RawRobot(spec)
    try:
        *_, resets = run_env(env, actions)
        raw.run(replay_targets(spec, actions, resets), resets)
        return bool(np.array_equal(raw.joint_positions(), env.sim.joint_states()[0]))
    finally:
        env.close()
        raw.close()


def bench_env_vs_raw(num_steps: int, rounds: int, profile: bool) -> dict[str, Any]:
    spec = load_robot_spec(ROBOT)
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, (num_steps, spec.num_joints)).astype(np.float32)
    same_physics = check_same_physics(spec, actions[:200])
    # joint_noise=0 so the raw loop replays the env's joint targets and resets.
    env = LocomotionEnv(spec, joint_noise=0.0)
    raw = RawRobot(spec)
    *_, resets = run_env(env, actions)
    targets = replay_targets(spec, actions, resets)
    env_seconds, raw_seconds, env_cpu, raw_cpu = [], [], [], []
    for _ in range(rounds):  # interleaved, so a burst of background load hits both alike
        wall, cpu, _ = run_env(env, actions)
        env_seconds.append(wall)
        env_cpu.append(cpu)
        wall, cpu = raw.run(targets, resets)
        raw_seconds.append(wall)
        raw_cpu.append(cpu)
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(run_env, env, actions)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    env.close()
    raw.close()
    return {
        "raw_steps_per_s": num_steps / min(raw_seconds),
        "env_steps_per_s": num_steps / min(env_seconds),
        # CPU time per step (best round): less sensitive than wall time to other processes taking the cores.
        "raw_cpu_us_per_step": 1e6 * min(raw_cpu) / num_steps,
        "env_cpu_us_per_step": 1e6 * min(env_cpu) / num_steps,
        "same_physics": same_physics,
        "episode_resets": int(resets.sum()),
    }


def bench_bound(num_steps: int, rounds: int) -> dict[str, float]:
    """`env_vs_raw_cpu` if parts of the env's own work cost nothing: each part replaced by a precomputed
    result, cumulatively (joint targets, then the observation, then the reward). The replayed targets
    keep the physics and the resets those of the real env (checked), so only the Python work changes."""
    spec = load_robot_spec(ROBOT)
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, (num_steps, spec.num_joints)).astype(np.float32)
    env, raw = LocomotionEnv(spec, joint_noise=0.0), RawRobot(spec)
    try:
        *_, resets = run_env(env, actions)
        targets = replay_targets(spec, actions, resets)
        raw_cpu = min(raw.run(targets, resets)[1] for _ in range(rounds))
        step = iter(())

        def env_cpu() -> float:
            nonlocal step
            best = float("inf")
            for _ in range(rounds):
                step = iter(targets)
                _, cpu, replayed = run_env(env, actions)
                if not np.array_equal(replayed, resets):
                    raise RuntimeError("the stubbed env left the real env's physics")
                best = min(best, cpu)
            return raw_cpu / best

        bound = {"as_is": env_cpu()}
        mapping, observation = env.mapping, env.mapping.observe(env.state)
        mapping.targets = lambda action: next(step)  # instance attributes shadow the methods
        bound["targets_free"] = env_cpu()
        mapping.observe = lambda state: observation
        bound["targets_observation_free"] = env_cpu()
        env.reward_fn = lambda state, action, previous: 0.0
        bound["targets_observation_reward_free"] = env_cpu()
        return {key: round(value, 4) for key, value in bound.items()}
    finally:
        env.close()
        raw.close()


def bench_sampler(backend: str, num_envs: int, num_steps: int, rounds: int, **kwargs: Any) -> dict[str, float]:
    """Env steps per second over all copies (best round) and the seconds to build the sampler."""
    start = time.perf_counter()
    envs = make_vector_env(functools.partial(LocomotionEnv, ROBOT), num_envs, backend, **kwargs)
    try:
        envs.reset(seed=0)
        startup = time.perf_counter() - start
        rng = np.random.default_rng(1)
        actions = rng.uniform(-1.0, 1.0, (num_steps, *envs.action_space.shape)).astype(np.float32)
        for action in actions[:20]:  # warm-up: first-touch costs in the workers
            envs.step(action)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for action in actions:
                envs.step(action)
            best = min(best, time.perf_counter() - start)
    finally:
        envs.close()
    return {"steps_per_s": num_envs * num_steps / best, "vector_steps_per_s": num_steps / best, "startup_s": startup}


def bench_ray(num_steps: int, rounds: int, ray_address: str | None) -> dict[str, float] | None:
    try:
        import ray
    except ImportError:
        return None
    started_here = not ray.is_initialized()
    try:
        return bench_sampler("ray", 2, num_steps, rounds, ray_address=ray_address)
    finally:
        if started_here:
            ray.shutdown()


def markdown(results: dict[str, Any]) -> str:
    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    def ratio(value: float | None, target: float | None = None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}" + ("" if target is None else f" (target >= {target})")

    rows = [
        ("raw PyBullet (SimRobot.step physics)", rate(results["raw_steps_per_s"]), ""),
        ("LocomotionEnv.step", rate(results["env_steps_per_s"]), ratio(results["env_vs_raw"], TARGETS["env_vs_raw"])),
        ("raw PyBullet, per CPU second", rate(1e6 / results["raw_cpu_us_per_step"]), ""),
        (
            "LocomotionEnv.step, per CPU second",
            rate(1e6 / results["env_cpu_us_per_step"]),
            ratio(results["env_vs_raw_cpu"]),
        ),
        ("sampler inline, 1 copy", rate(results["inline_1_steps_per_s"]), ""),
        ("sampler process, 1 worker", rate(results["process_1_steps_per_s"]), ""),
        (
            "sampler process, 2 workers",
            rate(results["process_2_steps_per_s"]),
            ratio(results["process_scaling"], TARGETS["process_scaling"]),
        ),
        ("sampler ray, 2 actors", rate(results["ray_2_steps_per_s"]), ratio(results["ray_vs_process"])),
    ]
    lines = ["| measurement | control steps/s | ratio |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {extra} |" for name, value, extra in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (about a minute)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--profile", action="store_true", help="cProfile LocomotionEnv.step to stderr")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument(
        "--bound",
        action="store_true",
        help="also env_vs_raw_cpu with targets, observation and reward precomputed (what compiling them could give)",
    )
    args = parser.parse_args(argv)
    env_steps, sampler_steps, rounds = (500, 300, 3) if args.quick else (3000, 2000, 5)

    results: dict[str, Any] = {"quick": args.quick, "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    results |= bench_env_vs_raw(env_steps, rounds, args.profile)
    if args.bound:  # before the samplers: a Ray shutdown still under way would disturb it
        results["bound_env_vs_raw_cpu"] = bench_bound(env_steps, rounds)
    inline = bench_sampler("inline", 1, sampler_steps, rounds)
    process_1 = bench_sampler("process", 1, sampler_steps, rounds)
    process_2 = bench_sampler("process", 2, sampler_steps, rounds)
    ray_2 = bench_ray(sampler_steps, rounds, args.ray_address)
    results |= {
        "inline_1_steps_per_s": inline["steps_per_s"],
        "process_1_steps_per_s": process_1["steps_per_s"],
        "process_2_steps_per_s": process_2["steps_per_s"],
        "ray_2_steps_per_s": None if ray_2 is None else ray_2["steps_per_s"],
        "ray_startup_s": None if ray_2 is None else ray_2["startup_s"],
        "process_startup_s": process_2["startup_s"],
    }
    results["env_vs_raw"] = results["env_steps_per_s"] / results["raw_steps_per_s"]
    results["env_vs_raw_cpu"] = results["raw_cpu_us_per_step"] / results["env_cpu_us_per_step"]
    results["process_scaling"] = process_2["steps_per_s"] / process_1["steps_per_s"]
    if ray_2 is None:
        results["ray_vs_process"] = results["ray_overhead_us_per_step"] = None
    else:
        results["ray_vs_process"] = ray_2["steps_per_s"] / process_2["steps_per_s"]
        # Extra wall time per vector step (both copies) that Ray adds over pipes.
        ray_seconds, process_seconds = 1 / ray_2["vector_steps_per_s"], 1 / process_2["vector_steps_per_s"]
        results["ray_overhead_us_per_step"] = 1e6 * (ray_seconds - process_seconds)
    results["targets"] = TARGETS
    if args.bound:
        results["bound_env_vs_raw_cpu"] = {
            key: round(value, 4) for key, value in results["bound_env_vs_raw_cpu"].items()
        }
    results = {key: round(value, 4) if isinstance(value, float) else value for key, value in results.items()}
    if not args.json:
        print(markdown(results))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
