"""`metactl eval`: the meta-test protocol of docs/DESIGN (K adaptation episodes, then E evaluation
episodes with the deterministic policy, per held-out task), in simulation, for a run of any algorithm.

The run's algorithm (its config.yaml `algorithm`) decides how the K episodes are used:
- MLSH: a new task's master starts as in the run's training (`mlsh.master_init`: fresh for "reset",
  as in Frans et al.; the meta-learned init for "meta"; the trained master for "keep") and adapts
  from the K episodes (K = 0 is that start);
- MAML, Meta-SGD, the learned optimizer: the inner step(s) on K sampled episodes, through the same
  function the robot adapter uses (sim/evaluation_meta.py);
- RL^2: the K episodes and then the evaluation episodes run as one trial, the hidden state carried
  (K = 0: a fresh memory; sim/evaluation_meta.py).
Methods compared on the same tasks and seeds:
- `--baseline RUN` (an MLSH run): a domain-randomized run without adaptation, and the same run
  fine-tuning all sub-policy weights from the K episodes (transfer learning);
- `--oracle RUN` (a run of any algorithm): trained with the true task parameters in its observation (K = 0).
Normalized score: (R_K - R_random) / (R_oracle - R_random), with R_random from uniform random actions.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from controller.adaptation import AdaptConfig, Episode, finetune_all, start_task_master, update_master
from controller.config import load_yaml
from controller.errors import ConfigError
from controller.mlsh_config import saved_master_init
from controller.mlsh_policy import MLSHPolicy
from controller.rundir import RunDir
from sim.env import LocomotionEnv
from sim.evaluation_meta import (
    ADAPTATION_LABELS,
    GRADIENT_ALGORITHMS,
    MetaModel,
    gradient_returns,
    load_meta_model,
    rl2_returns,
)
from sim.tasks import Task

MODES = ("adapt", "finetune", "none")
"""How `evaluate_method` uses the K episodes: the run's own adaptation, fine-tuning all weights
(MLSH runs: the transfer-learning baseline), or not at all (K ignored)."""


@dataclass
class MethodResult:
    """One method on one task at one K."""

    returns: list[float]
    """Each evaluation episode's return."""
    option_share: list[float] | None = None
    """MLSH runs with several sub-policies: the share of the master's choices that went to each
    sub-policy over the evaluation episodes (sums to 1); None otherwise."""

    @property
    def mean(self) -> float:
        """Mean deterministic evaluation return."""
        return float(np.mean(self.returns))


@dataclass
class LoadedRun:
    name: str
    policy: MLSHPolicy | None
    """MLSH runs: the hierarchical policy (None for the other algorithms)."""
    config: dict[str, Any]
    algorithm: str = "mlsh"
    """The run's config.yaml `algorithm`."""
    meta: MetaModel | None = None
    """Gradient-based and RL^2 runs: what their meta-test needs."""
    master_init: str = "keep"
    """MLSH runs: where a new task's master starts (the run's `mlsh.master_init`)."""
    master_init_state: dict[str, torch.Tensor] | None = None
    """MLSH runs with master_init "meta": the meta-learned master initialization."""

    @property
    def privileged(self) -> bool:
        return bool(self.config.get("env", {}).get("privileged", False))

    @property
    def method_name(self) -> str:
        """The table's name for the run adapting as its algorithm does, e.g. 'maml (inner step)'."""
        return f"{self.algorithm} ({ADAPTATION_LABELS.get(self.algorithm, 'adapt')})"


def load_run(path: str | Path) -> LoadedRun:
    """The run's checkpointed policy, rebuilt for its algorithm (config.yaml `algorithm`, default mlsh)."""
    run = RunDir(path)
    if not run.has_checkpoint():
        raise ConfigError(f"{run.path} has no checkpoint to evaluate")
    config = run.read_config()
    algorithm = str(config.get("algorithm", "mlsh"))
    checkpoint = run.load_checkpoint()
    if algorithm != "mlsh":
        return LoadedRun(
            Path(path).name, None, config, algorithm, load_meta_model(algorithm, checkpoint, str(run.path))
        )
    policy = MLSHPolicy(**checkpoint["policy_config"])
    policy.load_state_dict(checkpoint["policy"])
    return LoadedRun(
        Path(path).name,
        policy.eval(),
        config,
        master_init=saved_master_init(config.get("mlsh")),
        master_init_state=checkpoint.get("master_init"),
    )


def load_tasks(path: str | Path) -> list[Task]:
    """A YAML file with `tasks: [ {...}, ... ]`, a list, or a single task mapping."""
    data = yaml.safe_load(Path(path).read_text()) if Path(path).exists() else None
    if data is None:
        data = load_yaml(path)  # raises a ConfigError naming the file
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    items = data if isinstance(data, list) else [data]
    return [Task.from_dict(item) for item in items]


def rollout(
    env: LocomotionEnv,
    policy: MLSHPolicy | None,
    seed: int,
    *,
    sample_master: bool = False,
    sample_actions: bool = False,
    rng: np.random.Generator | None = None,
) -> Episode:
    """One episode with the runtime's semantics: a master choice every macro_steps ticks."""
    episode = Episode()
    obs, _ = env.reset(seed=seed)
    rng = rng or np.random.default_rng(seed)
    option, ticks_left = 0, 0
    generator = torch.Generator().manual_seed(seed)
    while True:
        if policy is None:
            action = rng.uniform(-1.0, 1.0, env.action_space.shape)
            logits, chose = np.zeros(1), False
        else:
            with torch.no_grad():
                obs_t = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
                logits_t, means = policy(obs_t)
                logits = logits_t[0].numpy()
                chose = ticks_left <= 0
                if chose:
                    if sample_master:
                        probs = np.exp(logits - logits.max())
                        option = int(rng.choice(len(probs), p=probs / probs.sum()))
                    else:
                        option = int(np.argmax(logits))
                    ticks_left = policy.macro_steps
                ticks_left -= 1
                if sample_actions:
                    action = policy.sub_act(obs_t, torch.tensor([option]), generator=generator)[0][0].numpy()
                else:
                    action = means[0, option].numpy()
        episode.obs.append(obs)
        episode.actions.append(np.asarray(action, dtype=np.float32))
        episode.options.append(option)
        episode.chose.append(chose)
        episode.logits.append(logits)
        obs, reward, terminated, truncated, info = env.step(action)
        episode.rewards.append(reward)
        if "base_vel" in info:  # locomotion envs only; the point task has no base
            episode.forward_velocity.append(float(info["base_vel"][0]))
        if terminated or truncated:
            episode.terminated = terminated
            return episode


def evaluate_method(
    env: LocomotionEnv, run: LoadedRun, k: int, mode: str, eval_episodes: int, seed: int
) -> MethodResult:
    """The deterministic evaluation returns after K adaptation episodes (and, for MLSH, which
    sub-policies the master chose in them).

    Args:
        mode: One of `MODES`: 'adapt' (the run's algorithm's own adaptation), 'finetune' (all
            weights, MLSH runs only) or 'none' (K ignored).
    """
    if mode not in MODES:
        raise ConfigError(f"evaluation mode '{mode}' unknown; valid: {', '.join(MODES)}")
    k = 0 if mode == "none" else k
    if run.algorithm != "mlsh":
        if mode == "finetune":
            raise ConfigError(f"fine-tuning all weights is an MLSH baseline; {run.name} is a {run.algorithm} run")
        if run.algorithm in GRADIENT_ALGORITHMS:
            returns = gradient_returns(env, run.meta, k, eval_episodes, seed)[0]
        else:
            returns = rl2_returns(env, run.meta.policy, k, eval_episodes, seed)
        return MethodResult(returns)
    policy = copy.deepcopy(run.policy)
    config = AdaptConfig()
    if mode == "adapt" and policy.num_subpolicies > 1:
        # The master a new task starts from in training; K = 0 evaluates that start.
        generator = torch.Generator().manual_seed(seed)
        config = start_task_master(policy.master, run.master_init, generator, run.master_init_state)
    if k > 0:
        rng = np.random.default_rng(seed)
        episodes = [
            rollout(env, policy, seed + 1000 + i, sample_master=True, sample_actions=mode == "finetune", rng=rng)
            for i in range(k)
        ]
        if mode == "adapt":
            update_master(policy, episodes, config, seed)
        else:
            finetune_all(policy, episodes, config, seed)
    episodes = [rollout(env, policy, seed + i) for i in range(eval_episodes)]
    returns = [episode.total_return for episode in episodes]
    share = None
    if policy.num_subpolicies > 1:
        chosen = [option for episode in episodes for option, chose in zip(episode.options, episode.chose) if chose]
        share = (np.bincount(chosen, minlength=policy.num_subpolicies) / max(len(chosen), 1)).tolist()
    return MethodResult(returns, share)


def evaluate(
    run_path: str | Path,
    tasks_path: str | Path,
    ks: list[int],
    *,
    baseline: str | Path | None = None,
    oracle: str | Path | None = None,
    eval_episodes: int = 2,
    seconds: float = 10.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocol; writes eval.md, eval.json and eval.png into `out_dir` (default: the run dir)."""
    tasks = load_tasks(tasks_path)
    main = load_run(run_path)
    methods: list[tuple[str, LoadedRun, str]] = [(main.method_name, main, "adapt")]
    if baseline is not None:
        base = load_run(baseline)
        if base.algorithm != "mlsh":
            raise ConfigError(
                f"--baseline needs an MLSH run (it fine-tunes all sub-policy weights); {baseline} is {base.algorithm}"
            )
        methods += [("domain-randomized PPO", base, "none"), ("fine-tune all", base, "finetune")]
    oracle_run = load_run(oracle) if oracle is not None else None
    robot = main.config.get("robot", "a1")
    env = LocomotionEnv(robot, episode_seconds=seconds, joint_noise=0.0)
    privileged_env = LocomotionEnv(robot, episode_seconds=seconds, joint_noise=0.0, privileged=True)
    results: dict[str, Any] = {
        "algorithm": main.algorithm,
        "tasks": [t.to_dict() for t in tasks],
        "ks": ks,
        "methods": {},
        "random": [],
        "oracle": [],
        "option_share": {},
    }
    total = len(tasks) * (1 + len(methods) * len(ks) + (oracle_run is not None))
    bar = tqdm(total=total, desc="eval", disable=not progress)
    for index, task in enumerate(tasks):
        task_seed = seed + 100 * index
        env.set_task(task)
        privileged_env.set_task(task)
        results["random"].append(
            float(np.mean([rollout(env, None, task_seed + i).total_return for i in range(eval_episodes)]))
        )
        bar.update(1)
        if oracle_run is not None:
            oracle_env = privileged_env if oracle_run.privileged else env
            results["oracle"].append(evaluate_method(oracle_env, oracle_run, 0, "none", eval_episodes, task_seed).mean)
            bar.update(1)
        for name, run, mode in methods:
            run_env = privileged_env if run.privileged else env
            per_k = results["methods"].setdefault(name, {str(k): [] for k in ks})
            for k in ks:
                result = evaluate_method(run_env, run, k, mode, eval_episodes, task_seed)
                per_k[str(k)].append(result.mean)
                if result.option_share is not None:
                    shares = results["option_share"].setdefault(name, {str(k): [] for k in ks})
                    shares[str(k)].append(result.option_share)
                bar.update(1)
    bar.close()
    env.close()
    privileged_env.close()
    results["summary"] = summarize(results)
    out = Path(out_dir) if out_dir is not None else Path(run_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    (out / "eval.md").write_text(markdown_table(results))
    plot(results, out / "eval.png")
    results["files"] = [str(out / name) for name in ("eval.md", "eval.json", "eval.png")]
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    random = np.array(results["random"])
    oracle = np.array(results["oracle"]) if results["oracle"] else None
    summary: dict[str, Any] = {}
    for name, per_k in results["methods"].items():
        summary[name] = {}
        for k, values in per_k.items():
            values = np.array(values)
            row = {"mean": float(values.mean()), "std": float(values.std())}
            if oracle is not None:
                score = (values - random) / np.maximum(oracle - random, 1e-6)
                row["normalized"] = float(score.mean())
            summary[name][k] = row
    summary["random"] = {"mean": float(random.mean())}
    if oracle is not None:
        summary["oracle"] = {"mean": float(oracle.mean())}
    return summary


def markdown_table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    has_score = "oracle" in summary
    lines = [
        "| method | K | return mean | return std (across tasks) |" + (" normalized score |" if has_score else ""),
        "|---|---:|---:|---:|" + ("---:|" if has_score else ""),
    ]
    for name in results["methods"]:
        for k, row in summary[name].items():
            score = f" {row['normalized']:.2f} |" if has_score else ""
            lines.append(f"| {name} | {k} | {row['mean']:.1f} | {row['std']:.1f} |{score}")
    lines.append(f"| random actions | - | {summary['random']['mean']:.1f} | |" + (" 0.00 |" if has_score else ""))
    if has_score:
        lines.append(f"| oracle (true task in obs) | 0 | {summary['oracle']['mean']:.1f} | | 1.00 |")
    if results.get("option_share"):
        # Which sub-policies the master used: a master that commits per task puts most choices on one
        # sub-policy, and on different ones for different tasks.
        lines += ["", "| method | K | master's choices per sub-policy, per task |", "|---|---:|---|"]
        for name, per_k in results["option_share"].items():
            for k, per_task in per_k.items():
                cells = " ; ".join("/".join(f"{share:.2f}" for share in shares) for shares in per_task)
                lines.append(f"| {name} | {k} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    ks = [int(k) for k in results["ks"]]
    for name in results["methods"]:
        means = [results["summary"][name][str(k)]["mean"] for k in ks]
        stds = [results["summary"][name][str(k)]["std"] for k in ks]
        axis.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=name)
    axis.axhline(results["summary"]["random"]["mean"], color="grey", linestyle=":", label="random")
    if "oracle" in results["summary"]:
        axis.axhline(results["summary"]["oracle"]["mean"], color="black", linestyle="--", label="oracle")
    axis.set_xlabel("adaptation episodes K")
    axis.set_ylabel("evaluation return")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
