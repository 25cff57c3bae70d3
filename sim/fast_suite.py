"""Meta-test of every algorithm and baseline on the point-navigation fast task (`metactl eval --suite point`).

Each method is trained on goals at angles [0, pi] and damping [0.5, 4] (`TRAIN_TASKS`), then
evaluated by the protocol of docs/DESIGN on the same held-out tasks: a third drawn from the training
ranges, a third with the goal at angles (pi, 1.25 pi), a third with damping in (4, 6]. Per task and
K: K adaptation episodes, the method's update, then E deterministic evaluation episodes. Reset
seeds depend on (seed, task index) only, with the draw order of `controller.baselines.evaluate_adaptation`,
so every method and every K sees the same evaluation starts, and the same adaptation starts.

How each method uses the K episodes:
- MAML, first-order MAML, Meta-SGD, learned optimizer: one inner step (`clone().adapt`) on the K
  stochastic episodes (meta-trained with one inner step on `episodes_per_task` episodes).
- RL^2: the K episodes are the first K of a deterministic trial; evaluation is episode K + 1 of
  E trials (meta-trained on trials of max(ks) + 1 episodes).
- MLSH: each task's master starts fresh, as in training (K = 0 is that master); the K episodes
  (master sampled) feed `update_master` (PPO on the master only; `NEW_MASTER_ADAPT`).
- fine-tune all / fine-tune head: PPO on all weights / the last layer of the domain-randomized policy.
- domain-randomized PPO, oracle (true task in its observation) and random actions ignore K: they
  are evaluated once and reported for every K.
The task splits, budgets and paired seeds are sim/fast_suite_setup.py's; the normalized score and the
report (eval.md, eval.json, eval.png) sim/fast_suite_report.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from controller import baselines
from controller.adaptation import NEW_MASTER_ADAPT, update_master
from controller.errors import ConfigError
from controller.learned_update import LearnedOptimizer, LearnedOptimizerMAML, MetaSGD
from controller.maml import MAML, MetaLearner
from controller.meta_episodes import discounted_returns, fit_linear_baseline, rollout
from controller.meta_trainer import MAMLConfig, MAMLTrainer
from controller.mlsh import MLSHTrainer
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.policies import GaussianMLPPolicy
from controller.ppo import PPOConfig
from controller.rl2 import GRUPolicy, RL2Config, RL2Trainer
from controller.rl2_rollout import run_trials
from controller.rundir import RunDir
from sim import evaluation
from sim.fast_suite_report import markdown_table, plot, summarize
from sim.fast_suite_setup import BUDGETS, TRAIN_TASKS, SuiteBudget, TaskSeeds, held_out_tasks, task_seeds
from sim.fast_tasks import PointNavEnv, PointNavTask, PointNavTaskDistribution
from sim.samplers import make_vector_env

logger = logging.getLogger(__name__)

META_LEARNERS = {"MAML": "maml", "first-order MAML": "fomaml", "Meta-SGD": "metasgd", "learned optimizer": "learned"}
"""Display name -> `_meta_learner` kind of the gradient-based meta-learners."""
REFERENCE = {"random": "random actions", "oracle": "oracle (true task in obs)"}
"""Method names of the normalized score's two ends."""


Evaluate = Callable[[Sequence[PointNavTask], int], np.ndarray]
"""(tasks, K) -> [num_tasks] mean evaluation return after K adaptation episodes."""


def _actor_names(policy: nn.Module) -> list[str]:
    return [name for name, _ in policy.named_parameters() if not name.startswith("critic")]


def _meta_learner(kind: str, budget: SuiteBudget, seed: int) -> Evaluate:
    """Meta-train one gradient-based meta-learner; its evaluator takes one inner step on the K episodes."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(4, 2, hidden=(32, 32), init_log_std=-0.5, normalize=False)
    names = _actor_names(policy)
    learners: dict[str, Callable[[], MetaLearner]] = {
        "maml": lambda: MAML(policy, 0.02, parameter_names=names),
        "fomaml": lambda: MAML(policy, 0.02, first_order=True, parameter_names=names),
        "metasgd": lambda: MetaSGD(policy, 0.02, parameter_names=names),
        "learned": lambda: LearnedOptimizerMAML(policy, LearnedOptimizer(step_size=0.02), parameter_names=names),
    }
    config = MAMLConfig(
        meta_batch_size=budget.meta_batch_size,
        episodes_per_task=budget.episodes_per_task,
        max_episode_steps=PointNavEnv().max_episode_steps,
        outer_learning_rate=3e-3,
        rule_learning_rate={"metasgd": 3e-2, "learned": 1e-2}.get(kind),
        outer_steps=3,
    )
    trainer = MAMLTrainer(learners[kind](), PointNavEnv, TRAIN_TASKS.sample_tasks, config, seed=seed)
    trainer.train(budget.meta_iterations)
    trainer.close()
    return functools.partial(_meta_learner_returns, trainer, budget.eval_episodes, seed)


def _meta_learner_returns(
    trainer: MAMLTrainer, num_eval_episodes: int, seed: int, tasks: Sequence[PointNavTask], k: int
) -> np.ndarray:
    config, learner = trainer.config, trainer.learner
    envs = [PointNavEnv() for _ in range(max(k, num_eval_episodes))]
    results = np.zeros(len(tasks))
    for index, task in enumerate(tasks):
        seeds = task_seeds(seed, index, num_eval_episodes, k)
        for env in envs:
            env.set_task(task)
        clone = learner.clone()
        if k > 0:
            generator = torch.Generator().manual_seed(seeds.generator)
            (episodes,) = rollout(
                [(learner.module.distribution, envs[:k])], config.max_episode_steps, seeds.adaptation, generator
            )
            # The trainer's inner-loss advantages: reward-to-go minus the linear baseline.
            returns = discounted_returns(episodes.rewards, episodes.mask, config.gamma)
            advantages = returns - fit_linear_baseline(episodes.obs, returns, episodes.mask, config.baseline_reg)
            if config.normalize_inner_advantages:
                valid = advantages[episodes.mask.bool()]
                advantages = (advantages - valid.mean()) / (valid.std(correction=0) + 1e-8)
            episodes.advantages = advantages * episodes.mask
            clone.adapt(trainer.inner_loss(clone, episodes), first_order=True)  # no meta-gradient at test time
        adapted = [(functools.partial(clone.call, "distribution"), envs[:num_eval_episodes])]
        (evaluated,) = rollout(adapted, config.max_episode_steps, seeds.evaluation, deterministic=True)
        results[index] = evaluated.episode_returns().mean().item()
    return results


def _rl2(budget: SuiteBudget, seed: int, max_k: int) -> Evaluate:
    torch.manual_seed(seed)
    policy = GRUPolicy(4, 2)
    ppo = PPOConfig(learning_rate=5e-3, epochs=4, num_minibatches=2, target_kl=None)
    config = RL2Config(num_trials=budget.rl2_trials, episodes_per_trial=max_k + 1, ppo=ppo)
    RL2Trainer(policy, PointNavEnv, TRAIN_TASKS.sample_tasks, config, seed=seed).train(budget.rl2_iterations)
    num_eval_episodes = budget.eval_episodes

    def evaluate(tasks: Sequence[PointNavTask], k: int) -> np.ndarray:
        # One deterministic trial of K + 1 episodes per (task, evaluation episode); the last one counts.
        rows = [(task, task_seeds(seed, index, num_eval_episodes, k)) for index, task in enumerate(tasks)]
        trial_tasks = [task for task, _ in rows for _ in range(num_eval_episodes)]
        trial_seeds = np.array(
            [[*seeds.adaptation, evaluation_seed] for _, seeds in rows for evaluation_seed in seeds.evaluation]
        )
        envs = [PointNavEnv() for _ in trial_tasks]
        trials = run_trials(policy, envs, trial_tasks, k + 1, trial_seeds, deterministic=True)
        return trials.episode_returns()[:, k].reshape(len(tasks), num_eval_episodes).mean(axis=1)

    return evaluate


def train_mlsh(
    tasks: PointNavTaskDistribution,
    num_task_groups: int,
    steps_per_iteration: int,
    seed: int,
    num_subpolicies: int = 4,
    master_init: str = "reset",
) -> MLSHTrainer:
    """MLSH on point-navigation tasks with the suite's settings; returns the trainer (envs closed).

    The master must settle on one sub-policy within the warm-up, or every sub-policy trains on every
    task and none specializes: so a long warm-up (W = 6, U = 2, after Frans et al.'s W >> U), a large
    master step without KL stop, and no gradient-norm clip for the master, whose value loss on raw
    macro-step returns (hundreds) would otherwise shrink its policy gradient under the shared clip.
    """
    torch.manual_seed(seed)
    policy = MLSHPolicy(
        4, 2, num_subpolicies=num_subpolicies, macro_steps=10, sub_hidden=(64, 64), master_hidden=(32, 32)
    )
    config = MLSHConfig(
        num_task_groups=num_task_groups,
        warmup_iterations=6,
        joint_iterations=2,
        steps_per_iteration=steps_per_iteration,
        master_init=master_init,
        master_ppo=PPOConfig(learning_rate=1e-2, num_minibatches=2, target_kl=None, max_grad_norm=None),
        sub_ppo=PPOConfig(num_minibatches=4),
    )
    envs = make_vector_env(PointNavEnv, 8, "inline")
    with tempfile.TemporaryDirectory(prefix="metactl-suite-mlsh-") as path:
        run_dir = RunDir(path)
        try:
            trainer = MLSHTrainer(policy, envs, lambda rng: tasks.sample_tasks(1, rng)[0], config, run_dir, seed=seed)
            trainer.train(progress=False)
        finally:
            run_dir.close()
            envs.close()
    return trainer


def mlsh_adapted_return(trainer: MLSHTrainer, env: PointNavEnv, seeds: TaskSeeds) -> float:
    """Mean deterministic return on `env`'s task of a new task's master adapted from len(seeds.adaptation) episodes.

    The master starts as a new task's does in training (`MLSHTrainer.start_master`: freshly
    initialized, or the meta-learned init), seeded by `seeds.generator`, so K = 0 is the
    pre-adaptation master of the same start; the K episodes sample the master and feed `update_master`.
    """
    policy = copy.deepcopy(trainer.policy)
    trainer.start_master(policy, torch.Generator().manual_seed(seeds.generator))
    if len(seeds.adaptation):
        rng = np.random.default_rng(seeds.generator)
        episodes = [evaluation.rollout(env, policy, int(s), sample_master=True, rng=rng) for s in seeds.adaptation]
        update_master(policy, episodes, NEW_MASTER_ADAPT, seeds.generator)
    return float(np.mean([evaluation.rollout(env, policy, int(s)).total_return for s in seeds.evaluation]))


def _mlsh(budget: SuiteBudget, seed: int) -> Evaluate:
    trainer = train_mlsh(TRAIN_TASKS, budget.mlsh_task_groups, budget.mlsh_steps_per_iteration, seed)
    num_eval_episodes, env = budget.eval_episodes, PointNavEnv()

    def evaluate(tasks: Sequence[PointNavTask], k: int) -> np.ndarray:
        results = np.zeros(len(tasks))
        for index, task in enumerate(tasks):
            env.set_task(task)
            results[index] = mlsh_adapted_return(trainer, env, task_seeds(seed, index, num_eval_episodes, k))
        return results

    return evaluate


def _multitask_ppo(budget: SuiteBudget, seed: int, privileged: bool) -> GaussianMLPPolicy:
    """Domain-randomized PPO (a `HeadTrunkPolicy`, shared by both fine-tuning baselines) or the oracle."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(7, 2) if privileged else baselines.HeadTrunkPolicy(4, 2)
    env_fn = functools.partial(PointNavEnv, privileged=privileged)
    config = baselines.MultiTaskPPOConfig(num_envs=16, ppo=PPOConfig(learning_rate=1e-3))
    trainer = baselines.MultiTaskPPOTrainer(policy, env_fn, TRAIN_TASKS.sample_tasks, config, seed=seed)
    trainer.train(budget.ppo_iterations)
    return policy


def _random_returns(num_eval_episodes: int, seed: int, tasks: Sequence[PointNavTask], k: int) -> np.ndarray:
    env, results = PointNavEnv(), np.zeros(len(tasks))
    for index, task in enumerate(tasks):
        env.set_task(task)
        seeds = task_seeds(seed, index, num_eval_episodes, 0).evaluation
        results[index] = np.mean([evaluation.rollout(env, None, int(s)).total_return for s in seeds])
    return results


def run_suite(
    ks: Sequence[int] = (0, 1, 3, 5),
    num_tasks: int | None = None,
    eval_episodes: int | None = None,
    seed: int = 0,
    budget: str | SuiteBudget = "quick",
    out_dir: str | Path = "runs/point_suite",
    progress: bool = True,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Train every method on the point task, meta-test all on the same held-out tasks, write the report.

    Args:
        ks: Adaptation episode counts K (distinct, >= 0).
        num_tasks: Held-out tasks; None: the budget's.
        eval_episodes: E, deterministic evaluation episodes per task and K; None: the budget's.
        seed: Seeds training (every method) and the held-out tasks and reset seeds.
        budget: "quick", "full" (see `BUDGETS`) or a `SuiteBudget`.
        out_dir: Where eval.md, eval.json and eval.png are written (created if missing).
        progress: Show a progress bar.
        num_threads: torch threads while the suite runs (restored afterwards); None leaves them.

    Returns:
        The eval.json content: tasks (with their split), ks, per-method per-task returns
        (`methods[name][str(k)]`), `summary[name][str(k)]` with mean, std (across tasks) and
        normalized scores (overall and per split), train_seconds, load averages, files written.

    Raises:
        ConfigError: An unknown budget name, or bad ks / num_tasks / eval_episodes.
    """
    if isinstance(budget, SuiteBudget):
        budget_name = "custom"
    elif isinstance(budget, str) and budget in BUDGETS:
        budget_name, budget = budget, BUDGETS[budget]
    else:
        raise ConfigError(f"suite budget {budget!r} unknown; valid: {', '.join(BUDGETS)} or a SuiteBudget")
    overrides = {"num_tasks": num_tasks, "eval_episodes": eval_episodes}
    budget = dataclasses.replace(budget, **{key: value for key, value in overrides.items() if value is not None})
    ks = list(ks)
    if not ks or len(set(ks)) != len(ks) or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ks):
        raise ConfigError(f"ks must be distinct ints >= 0, got {ks!r}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        results = _run(ks, budget, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)
    results.update(budget=budget_name, budget_settings=dataclasses.asdict(budget))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["files"] = [str(out / name) for name in ("eval.md", "eval.json", "eval.png")]
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    (out / "eval.md").write_text(markdown_table(results))
    plot(results, out / "eval.png")
    return results


def _run(ks: list[int], budget: SuiteBudget, seed: int, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    tasks, splits = held_out_tasks(budget.num_tasks, seed)
    num_eval_episodes = budget.eval_episodes
    bar = tqdm(total=8 + 11, desc="point suite", disable=not progress)  # 8 trainings, 11 evaluations
    train_seconds: dict[str, float] = {}

    def train(name: str, build: Callable[[], Any]) -> Any:
        bar.set_postfix_str(f"training {name}")
        begin = time.perf_counter()
        built = build()
        train_seconds[name] = time.perf_counter() - begin
        logger.info("point suite: trained %s in %.1f s", name, train_seconds[name])
        bar.update(1)
        return built

    evaluators: dict[str, tuple[Evaluate, bool]] = {}  # name -> (evaluate, uses the K episodes)
    for name, kind in META_LEARNERS.items():
        evaluators[name] = (train(name, functools.partial(_meta_learner, kind, budget, seed)), True)
    evaluators["RL^2"] = (train("RL^2", lambda: _rl2(budget, seed, max(ks))), True)
    evaluators["MLSH (adapt master)"] = (train("MLSH (adapt master)", lambda: _mlsh(budget, seed)), True)
    randomized = train("domain-randomized PPO", lambda: _multitask_ppo(budget, seed, privileged=False))
    oracle = train(REFERENCE["oracle"], lambda: _multitask_ppo(budget, seed, privileged=True))

    def adaptation(policy: nn.Module, adapt: Any, env_fn: Callable[[], PointNavEnv] = PointNavEnv) -> Evaluate:
        return lambda tasks, k: baselines.evaluate_adaptation(policy, env_fn, tasks, k, num_eval_episodes, adapt, seed)

    evaluators["domain-randomized PPO"] = (adaptation(randomized, None), False)
    evaluators["fine-tune all"] = (adaptation(randomized, baselines.finetune), True)
    evaluators["fine-tune head"] = (adaptation(randomized, baselines.finetune_head), True)
    evaluators[REFERENCE["oracle"]] = (adaptation(oracle, None, functools.partial(PointNavEnv, privileged=True)), False)
    evaluators[REFERENCE["random"]] = (functools.partial(_random_returns, num_eval_episodes, seed), False)
    methods: dict[str, dict[str, list[float]]] = {}
    for name, (evaluate, uses_k) in evaluators.items():
        bar.set_postfix_str(f"evaluating {name}")
        if uses_k:
            methods[name] = {str(k): evaluate(tasks, k).tolist() for k in ks}
        else:  # K has no effect: evaluate once, report for every K
            returns = evaluate(tasks, 0).tolist()
            methods[name] = {str(k): returns for k in ks}
        bar.update(1)
    bar.close()
    results: dict[str, Any] = {
        "suite": "point",
        "seed": seed,
        "ks": ks,
        "eval_episodes": num_eval_episodes,
        "train_tasks": TRAIN_TASKS.to_dict(),
        "tasks": [{**task.to_dict(), "split": split} for task, split in zip(tasks, splits)],
        "methods": methods,
        "uses_adaptation": {name: uses_k for name, (_, uses_k) in evaluators.items()},
        "reference": dict(REFERENCE),
        "train_seconds": train_seconds,
    }
    results["summary"] = summarize(results)
    results.update(seconds=time.perf_counter() - start, load_average=[load_start, os.getloadavg()[0]])
    return results
