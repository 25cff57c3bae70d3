"""This project's PPO against Stable-Baselines3's PPO: training throughput and final return on the A1.

    python benchmarks/ppo_vs_sb3.py [--quick] [--json] [--seed N]

"Ours" is domain-randomized PPO as this project runs it: the MLSH trainer with one sub-policy and no
warm-up (a one-option master is a no-op), built through `sim.training` from overrides. SB3 is `PPO`
with `MlpPolicy` behind `VecNormalize` (observations only, as our policy's own normalizer) and
`Monitor`. Both train on `LocomotionEnv("a1")` with one fixed task (the nominal robot, command 0.5
m/s) and the same settings, taken from our config: total env steps, rollout length (summed over env
copies), minibatch size, epochs, learning rate, gamma, GAE lambda, clip range, value coefficient,
gradient clipping, target KL, Adam epsilon, 64-64 tanh actor and critic (separate), orthogonal init and
initial log std. Known differences: SB3 standardizes advantages per minibatch (ours per batch) and
updates its observation statistics every step (ours after each update).

Each side runs in its fastest configuration here, picked by a short pilot in the same run (ours:
sampler backend x env copies x torch threads, the backends being "worker" (each worker process runs
the policy on its env copy and returns a whole rollout per iteration), "process" (the policy runs in
the main process, one message pair per step) and "inline"; SB3: DummyVecEnv / SubprocVecEnv x env
copies x torch threads). The env limit is `LocomotionEnv.step` with random actions in 2 independent
processes at once (no sampler, no policy), also measured in this run, before and after the training
runs.

Reported: training env steps/s (wall time of the whole training loop, updates included, env
construction excluded), speedup = ours / SB3, fraction_of_env_limit = ours / env limit, and for each
side the mean return of its last completed training episodes and of a few deterministic evaluation
episodes on the same task (same reset seeds). Timings on a shared machine: the 1-minute load average
is recorded at the start and the end, and CPU time per env step is reported beside the wall-clock
rates, of the main process and of all processes (main + env workers, from /proc on Linux), with the
critical-path rate (`_cpu_stats` in ppo_vs_sb3_training.py): CPU time moves far less with background
load than wall time does, so each side's best critical-path rate in the pilot, against the other's
and against the env limit's, gives load-robust companions of speedup and fraction_of_env_limit.
Prints a Markdown table, then the JSON object as the last line (`--json`: the JSON line alone).

The training runs and the evaluation are in ppo_vs_sb3_training.py; this file holds the env limit,
the pilot, the comparison and the report.

Needs the `bench` extra (installs nothing at run time): pip install -c constraints.txt -e ".[bench]"
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from sim.env import LocomotionEnv
from sim.samplers import make_vector_env
from sim.tasks import Task

if __package__:  # python -m benchmarks.ppo_vs_sb3, or imported as benchmarks.ppo_vs_sb3
    from . import ppo_vs_sb3_training as training
else:  # python benchmarks/ppo_vs_sb3.py: this file's directory is sys.path[0]
    import ppo_vs_sb3_training as training

TARGETS = {"speedup": 2.0, "fraction_of_env_limit": 0.6}
ENV_LIMIT_PROCESSES = 2
"""Processes stepping their own env at once for the env limit."""
OUR_CANDIDATES = [("worker", 2, 1), ("process", 2, 1), ("process", 4, 1), ("inline", 1, 1)]
"""(sampler backend, env copies, torch threads)."""
SB3_CANDIDATES = [("subproc", 2, 1), ("subproc", 2, 2), ("subproc", 4, 1), ("dummy", 1, 1), ("dummy", 1, 2)]
"""(vec env, env copies, torch threads)."""


def _env_limit_worker(num_steps: int, seed: int, barrier: Any, results: Any) -> None:
    env = LocomotionEnv(training.ROBOT, Task.from_dict(training.TASK), episode_seconds=training.EPISODE_SECONDS)
    actions = np.random.default_rng(seed).uniform(-1.0, 1.0, (num_steps, *env.action_space.shape)).astype(np.float32)
    env.reset(seed=seed)
    for action in actions[:50]:  # warm-up
        env.step(action)
    barrier.wait()
    start, cpu_start = time.perf_counter(), time.process_time()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    results.put((num_steps / (time.perf_counter() - start), 1e6 * (time.process_time() - cpu_start) / num_steps))
    env.close()


def env_limit(num_steps: int, num_processes: int = ENV_LIMIT_PROCESSES) -> tuple[float, float]:
    """Env steps/s of `num_processes` processes stepping their own env with random actions at once, and
    the CPU microseconds one env step takes (mean over the processes)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(num_processes), context.Queue()
    workers = [
        context.Process(target=_env_limit_worker, args=(num_steps, seed, barrier, results))
        for seed in range(num_processes)
    ]
    for worker in workers:
        worker.start()
    rates, cpu_us = zip(*[results.get(timeout=600) for _ in workers])
    for worker in workers:
        worker.join()
    return float(sum(rates)), float(np.mean(cpu_us))


def sampler_limit(num_steps: int, num_envs: int = 2) -> float:
    """Env steps/s of the process sampler with random actions (the env limit plus its IPC)."""
    env_fn = functools.partial(
        LocomotionEnv, training.ROBOT, Task.from_dict(training.TASK), episode_seconds=training.EPISODE_SECONDS
    )
    envs = make_vector_env(env_fn, num_envs, "process")
    try:
        envs.reset(seed=0)
        actions = np.random.default_rng(0).uniform(-1.0, 1.0, (num_steps, *envs.action_space.shape))
        actions = actions.astype(np.float32)
        for action in actions[:20]:
            envs.step(action)
        start = time.perf_counter()
        for action in actions:
            envs.step(action)
        return num_envs * num_steps / (time.perf_counter() - start)
    finally:
        envs.close()


def pilot(total_steps: int) -> dict[str, dict[str, dict[str, float]]]:
    """Steps/s and CPU per step (main process; all processes) of every candidate configuration on a
    short run, ours and SB3's interleaved.

    Two rounds, keeping each candidate's best: the second round re-measures only the candidates
    within half of their side's best, so a configuration that collapses under load is run once.
    """
    sides = {"ours": (OUR_CANDIDATES, training.train_ours), "sb3": (SB3_CANDIDATES, training.train_sb3)}
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in sides}
    for round_index in range(2):
        for index in range(max(len(OUR_CANDIDATES), len(SB3_CANDIDATES))):
            for side, (candidates, run) in sides.items():
                if index >= len(candidates):
                    continue
                name, rates = "{}-{} threads-{}".format(*candidates[index]), results[side]
                best = max((rate["steps_per_s"] for rate in rates.values()), default=0.0)
                if round_index and rates[name]["steps_per_s"] < 0.5 * best:
                    continue
                measured = run(total_steps, *candidates[index])
                previous = rates.get(name, {})
                rates[name] = {
                    **{
                        key: max(previous.get(key, 0.0), measured[key])
                        for key in ("steps_per_s", "critical_path_steps_per_s")
                    },
                    **{
                        key: min(previous.get(key, float("inf")), measured[key])
                        for key in ("main_cpu_us_per_step", "cpu_us_per_step")
                    },
                }
    return results


@contextlib.contextmanager
def _native_stdout_to_devnull() -> Iterator[None]:
    """PyBullet prints to the C-level stdout on connect, here and in every worker: keep that off our output."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _parse(name: str) -> tuple[str, int, int]:
    kind, threads = name.split(" threads-")
    backend, num_envs = kind.rsplit("-", 1)
    return backend, int(num_envs), int(threads)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def markdown(results: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

    ours, sb3 = results["ours"], results["sb3"]
    rows = [
        ("configuration (fastest in the pilot)", ours["config"], sb3["config"]),
        ("training env steps/s", number(ours["steps_per_s"], 0), number(sb3["steps_per_s"], 0)),
        ("training wall time (s)", number(ours["seconds"]), number(sb3["seconds"])),
        (
            "main-process CPU µs per env step",
            number(ours["main_cpu_us_per_step"], 0),
            number(sb3["main_cpu_us_per_step"], 0),
        ),
        (
            "all-process CPU µs per env step (main + env workers)",
            number(ours["cpu_us_per_step"], 0),
            number(sb3["cpu_us_per_step"], 0),
        ),
        (
            "critical-path env steps/s (CPU bound for an idle machine)",
            number(ours["critical_path_steps_per_s"], 0),
            number(sb3["critical_path_steps_per_s"], 0),
        ),
        (
            f"return, last {training.NUM_RECENT_EPISODES} training episodes",
            number(results["our_final_return"]),
            number(results["sb3_final_return"]),
        ),
        (
            f"return, deterministic, {results['eval_episodes']} episodes",
            f"{number(results['our_eval_return'])} ± {number(ours['eval_std'])}",
            f"{number(results['sb3_eval_return'])} ± {number(sb3['eval_std'])}",
        ),
    ]
    lines = [
        f"{results['total_steps']:,} env steps each, rollout {training.ROLLOUT_STEPS}, "
        f"minibatch {results['minibatch']}, {results['epochs']} epochs; "
        f"load average {results['load_avg_start']:.1f} -> {results['load_avg_end']:.1f} "
        f"on {results['cpu_count']} cores",
        "",
        "| | ours (MLSH trainer, K=1) | Stable-Baselines3 PPO |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += [
        "",
        "| ratio | value | target |",
        "|---|---:|---:|",
        f"| speedup (ours / SB3) | {results['speedup']:.2f} | >= {TARGETS['speedup']} |",
        f"| fraction_of_env_limit (ours / {number(results['env_limit_steps_per_s'], 0)} steps/s) | "
        f"{results['fraction_of_env_limit']:.2f} | >= {TARGETS['fraction_of_env_limit']} |",
        f"| ours / process sampler with random actions ({number(results['sampler_limit_steps_per_s'], 0)} "
        f"steps/s) | {results['fraction_of_sampler_limit']:.2f} | |",
        f"| all-process CPU per env step, SB3 / ours | {results['cpu_ratio']:.2f} | |",
        "| critical-path speedup, best in the pilot (ours {} / SB3 {}) | {:.2f} | |".format(
            *results["critical_path_configs"], results["critical_path_speedup"]
        ),
        f"| critical-path fraction of the env limit's ({ENV_LIMIT_PROCESSES} x 1e6 / env CPU µs per step), "
        f"best in the pilot | {results['critical_path_fraction_of_env_limit']:.2f} | |",
        f"| CPU per env step, SB3 dummy-1 / ours inline-1 (pilot) | {results['single_process_cpu_ratio']:.2f} | |",
        "",
        f"One env step alone (random actions) takes {number(results['env_cpu_us_per_step'], 0)} CPU µs; in the "
        "inline and dummy configurations the main process does all the work.",
        "",
        f"| pilot, {results['pilot']['steps']} steps | configuration | steps/s | CPU µs per env step, main process "
        "| all processes | critical-path steps/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for side, label in (("ours", "ours"), ("sb3", "SB3")):
        for name, rate in results["pilot"][side].items():
            lines.append(
                f"| {label} | {name} | {number(rate['steps_per_s'], 0)} | {number(rate['main_cpu_us_per_step'], 0)} "
                f"| {number(rate['cpu_us_per_step'], 0)} | {number(rate['critical_path_steps_per_s'], 0)} |"
            )
    return "\n".join(lines)


def measure(total_steps: int, limit_steps: int, eval_episodes: int, seed: int = training.SEED) -> dict[str, Any]:
    """Env limit, pilot, both training runs (seeded by `seed`) and their evaluations, in that order; the raw results."""
    env_limit_before, env_cpu_before = env_limit(limit_steps)
    sampler = sampler_limit(limit_steps // 2)
    pilots = pilot(training.ROLLOUT_STEPS)
    our_choice, sb3_choice = (max(pilots[side], key=lambda name: pilots[side][name]["steps_per_s"]) for side in pilots)
    runs = {
        "ours": training.train_ours(total_steps, *_parse(our_choice), seed=seed),
        "sb3": training.train_sb3(total_steps, *_parse(sb3_choice), seed=seed),
    }
    env_limit_after, env_cpu_after = env_limit(limit_steps)
    load_end = os.getloadavg()[0]
    sides = {}
    for (name, run), choice in zip(runs.items(), (our_choice, sb3_choice)):
        returns = training.evaluate(run.pop("act"), eval_episodes)
        sides[name] = {"config": choice, **run, "eval_returns": returns, "eval_std": float(np.std(returns))}
    ours, sb3 = sides["ours"], sides["sb3"]
    limit = (env_limit_before + env_limit_after) / 2
    critical = {
        side: max(
            ((name, rate["critical_path_steps_per_s"]) for name, rate in pilots[side].items()), key=lambda x: x[1]
        )
        for side in pilots
    }
    return {
        "load_avg_end": load_end,
        "speedup": ours["steps_per_s"] / sb3["steps_per_s"],
        "fraction_of_env_limit": ours["steps_per_s"] / limit,
        "our_final_return": _mean(ours["recent_returns"]),
        "sb3_final_return": _mean(sb3["recent_returns"]),
        "our_eval_return": _mean(ours["eval_returns"]),
        "sb3_eval_return": _mean(sb3["eval_returns"]),
        "our_steps_per_s": ours["steps_per_s"],
        "sb3_steps_per_s": sb3["steps_per_s"],
        "env_limit_steps_per_s": limit,
        "env_limit_before_after": [env_limit_before, env_limit_after],
        "env_cpu_us_per_step": (env_cpu_before + env_cpu_after) / 2,
        "sampler_limit_steps_per_s": sampler,
        "fraction_of_sampler_limit": ours["steps_per_s"] / sampler,
        "cpu_ratio": sb3["cpu_us_per_step"] / ours["cpu_us_per_step"],
        # Load-robust companions of speedup and fraction_of_env_limit: each side's best critical-path rate in
        # the pilot (see ppo_vs_sb3_training._cpu_stats) against each other and against the env limit's own
        # (ENV_LIMIT_PROCESSES processes, each 1e6 / env CPU us per step).
        "critical_path_configs": [name for name, _ in critical.values()],
        "critical_path_speedup": critical["ours"][1] / critical["sb3"][1],
        "critical_path_fraction_of_env_limit": critical["ours"][1]
        / (ENV_LIMIT_PROCESSES * 1e6 / ((env_cpu_before + env_cpu_after) / 2)),
        # Load-robust companion of the speedup: CPU per env step of the single-process configurations, where
        # the main process does everything (env included); SB3's over ours.
        "single_process_cpu_ratio": pilots["sb3"]["dummy-1 threads-1"]["main_cpu_us_per_step"]
        / pilots["ours"]["inline-1 threads-1"]["main_cpu_us_per_step"],
        "pilot": {"steps": training.ROLLOUT_STEPS, **pilots},
        "ours": ours,
        "sb3": sb3,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 20k env steps each instead of 200k")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--seed", type=int, default=training.SEED, help="seed of both training runs (network init, sampling)"
    )
    args = parser.parse_args(argv)
    try:
        import stable_baselines3
    except ImportError:
        sys.exit('stable-baselines3 is missing: pip install -c constraints.txt -e ".[bench]"')
    # Imported once here, so the first timed run does not pay for the run directory's writers.
    import matplotlib.pyplot  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    iterations, limit_steps, eval_episodes = (10, 3000, 3) if args.quick else (98, 10000, 5)
    config = training.our_config(iterations * training.ROLLOUT_STEPS, "inline", 1)
    results: dict[str, Any] = {
        "quick": args.quick,
        "seed": args.seed,
        "total_steps": iterations * training.ROLLOUT_STEPS,
        "minibatch": training.ROLLOUT_STEPS // config.mlsh.sub_ppo.num_minibatches,
        "epochs": config.mlsh.sub_ppo.epochs,
        "eval_episodes": eval_episodes,
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "stable_baselines3": stable_baselines3.__version__},
        "targets": TARGETS,
    }
    with _native_stdout_to_devnull():
        results |= measure(results["total_steps"], limit_steps, eval_episodes, args.seed)
    results = _rounded(results)
    if not args.json:
        print(markdown(results))
    print(json.dumps(results))
    return results


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


if __name__ == "__main__":
    main()
