"""onnxruntime policy runtimes for a bundle: MLSH option state and RL^2 memory live here, not in the caller.

`open_runtime` picks the runtime from the manifest's algorithm: `PolicyRuntime` (MLSH master and
sub-policies), `GaussianRuntime` (a plain Gaussian actor: MAML, Meta-SGD, learned optimizer) or
`RL2Runtime` (a recurrent actor). All three offer the same tick interface to the control loop:
`reset()` at an episode start, `act(obs, deterministic) -> (action, info)`, `observe(reward)`
after each step, and `reload(path)` to swap in a new version between ticks.

numpy + onnxruntime only (no torch): this is what runs on the robot's computer.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from deploy.bundle import (
    GAUSSIAN_OUTPUT_NAMES,
    GRADIENT_ALGORITHMS,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    Bundle,
    load_bundle,
    manifest_json,
)
from deploy.errors import BundleError


def _options(optimization: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = optimization
    return options


def make_session(path: Path, optimized_path: Path | None = None) -> ort.InferenceSession:
    """A session tuned for batch-1 latency: one thread, sequential execution, full graph optimization.

    With `optimized_path`, the optimized graph is saved there on first load and loaded from there
    afterwards (without optimizing again), so the robot starts faster; the caller names the cache
    after the graph's content so a changed graph never meets an old cache.
    """
    providers = ["CPUExecutionProvider"]
    if optimized_path is not None and optimized_path.exists():
        try:
            options = _options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            return ort.InferenceSession(str(optimized_path), sess_options=options, providers=providers)
        except Exception:  # a cache from another onnxruntime: rebuild it below
            optimized_path.unlink(missing_ok=True)
    options = _options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise BundleError(f"onnxruntime cannot load {path}: {error}") from error


def _cache_path(policy_path: Path) -> Path | None:
    """Where the optimized graph is kept: beside the policy (if writable), named by its content.

    By content, not time: a rollback restores an older file whose mtime says nothing about the cache.
    """
    if not os.access(policy_path.parent, os.W_OK):
        return None
    digest = hashlib.sha256(policy_path.read_bytes()).hexdigest()[:16]
    return policy_path.with_name(f".policy.{digest}.optimized.onnx")


def open_session(bundle: Bundle, inputs: list[str], outputs: list[str]) -> ort.InferenceSession:
    """The bundle's policy graph, checked: its metadata is the manifest, its I/O names are these.

    Raises:
        BundleError: naming the mismatch.
    """
    model = onnx.load(str(bundle.policy_path), load_external_data=False)
    stored = {entry.key: entry.value for entry in model.metadata_props}.get(METADATA_KEY)
    if stored is None or json.loads(stored) != json.loads(manifest_json(bundle.manifest)):
        raise BundleError(f"{bundle.policy_path}: the ONNX metadata does not match {bundle.path / 'manifest.yaml'}")
    session = make_session(bundle.policy_path, _cache_path(bundle.policy_path))
    got_inputs = [node.name for node in session.get_inputs()]
    got_outputs = [node.name for node in session.get_outputs()]
    if got_inputs != inputs or got_outputs != outputs:
        raise BundleError(
            f"{bundle.policy_path}: expected inputs {inputs} outputs {outputs}, got {got_inputs} {got_outputs}"
        )
    return session


def open_runtime(
    bundle: Bundle | str | Path, rng: np.random.Generator | None = None
) -> PolicyRuntime | GaussianRuntime | RL2Runtime:
    """The runtime for the bundle's algorithm (`PolicyRuntime`, `GaussianRuntime` or `RL2Runtime`)."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if bundle.algorithm == "mlsh":
        return PolicyRuntime(bundle, rng)
    if bundle.algorithm in GRADIENT_ALGORITHMS:
        return GaussianRuntime(bundle, rng)
    return RL2Runtime(bundle)


class PolicyRuntime:
    """Runs a bundle's policy one control tick at a time.

    The master picks a sub-policy every `macro_steps` ticks (argmax when deterministic, sampled
    otherwise); between picks the chosen sub-policy's action is returned.
    """

    def __init__(self, bundle: Bundle | str | Path, rng: np.random.Generator | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.rng = rng or np.random.default_rng(0)
        self._lock = threading.Lock()
        self._load(self.bundle)
        self.reset()

    def _load(self, bundle: Bundle) -> None:
        if bundle.algorithm != "mlsh":
            raise BundleError(f"bundle {bundle.path} holds a {bundle.algorithm} policy; open it with open_runtime()")
        self._session = open_session(bundle, [INPUT_NAME], list(OUTPUT_NAMES))
        self.bundle = bundle
        self.obs_dim = int(bundle.manifest["observation"]["dim"])
        self.macro_steps = bundle.macro_steps

    def reload(self, path: str | Path | None = None) -> None:
        """Load a (new) version of the bundle; the swap itself happens between ticks under a lock."""
        bundle = load_bundle(path or self.bundle.path)
        session_owner = PolicyRuntime.__new__(PolicyRuntime)
        session_owner._load(bundle)  # slow part, outside the lock
        with self._lock:
            self._session, self.bundle = session_owner._session, bundle
            self.macro_steps = bundle.macro_steps

    def reset(self) -> None:
        self.option = -1
        self._ticks_left = 0

    def observe(self, reward: float) -> None:
        """The reward the last action earned (unused: MLSH adapts offline, from whole episodes)."""

    def infer(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """obs [obs_dim] or [B, obs_dim] -> (master_logits [B, K], sub_actions [B, K, act_dim])."""
        batch = np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim)
        with self._lock:
            logits, actions = self._session.run(None, {INPUT_NAME: batch})
        return logits, actions

    def act(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, dict]:
        """One tick: returns the action [act_dim] and info (option, whether the master chose now)."""
        logits, actions = self.infer(obs)
        chose = self._ticks_left <= 0
        if chose:
            if deterministic:
                self.option = int(np.argmax(logits[0]))
            else:
                probs = np.exp(logits[0] - logits[0].max())
                self.option = int(self.rng.choice(len(probs), p=probs / probs.sum()))
            self._ticks_left = self.macro_steps
        self._ticks_left -= 1
        return actions[0, self.option], {"option": self.option, "chose": chose, "logits": logits[0]}


class RecurrentRuntime:
    """Runs a recurrent (RL^2) graph `obs, hidden -> action, hidden_out` one tick at a time.

    The hidden state is the policy's memory of the task: it carries across the episodes of one
    trial and is zeroed only by `reset_trial()`. Each tick's graph input is
    [obs, previous action, previous reward, episode-start flag], the layout of
    `controller.rl2.GRUPolicy.step_input`.
    """

    INPUT_NAMES = ("obs", "hidden")
    OUTPUT_NAMES = ("action", "hidden_out")

    def __init__(self, path: str | Path, obs_dim: int, session: ort.InferenceSession | None = None) -> None:
        self._session = session or make_session(Path(path))
        inputs = {node.name: node.shape for node in self._session.get_inputs()}
        outputs = [node.name for node in self._session.get_outputs()]
        if tuple(inputs) != self.INPUT_NAMES or tuple(outputs) != self.OUTPUT_NAMES:
            raise BundleError(
                f"{path}: a recurrent policy needs inputs {list(self.INPUT_NAMES)} and outputs "
                f"{list(self.OUTPUT_NAMES)}, got {list(inputs)} {outputs}"
            )
        input_dim, self.hidden_size = int(inputs["obs"][-1]), int(inputs["hidden"][-1])
        self.obs_dim = obs_dim
        self.act_dim = input_dim - obs_dim - 2
        if self.act_dim < 1:
            raise BundleError(f"{path}: step input width {input_dim} does not fit obs_dim {obs_dim}")
        self.reset_trial()

    def reset_trial(self) -> None:
        """A new task: forget everything."""
        self.hidden = np.zeros((1, self.hidden_size), dtype=np.float32)
        self._previous_action = np.zeros(self.act_dim, dtype=np.float32)
        self._previous_reward = 0.0
        self._started = False
        self._episode_start = False

    def start_episode(self) -> None:
        """A new episode of the same trial: the memory stays, the graph is told the episode restarted."""
        self._episode_start = self._started
        self._previous_action[:] = 0.0
        self._previous_reward = 0.0

    def act(self, obs: np.ndarray, previous_reward: float | None = None) -> np.ndarray:
        """One tick; `previous_reward` is the reward the last action earned (None on an episode's first tick)."""
        if previous_reward is not None:
            self._previous_reward = float(previous_reward)
        step_input = np.concatenate(
            [
                np.asarray(obs, dtype=np.float32).reshape(self.obs_dim),
                self._previous_action,
                [self._previous_reward, 1.0 if self._episode_start else 0.0],
            ]
        ).astype(np.float32)[None]
        action, self.hidden = self._session.run(None, {"obs": step_input, "hidden": self.hidden})
        self._started = True
        self._episode_start = False
        self._previous_action = np.clip(action[0], -1.0, 1.0).astype(np.float32)
        return action[0]


class GaussianRuntime:
    """Runs a plain Gaussian actor (obs -> action mean, log_std): the mean, or a sample when adapting."""

    def __init__(self, bundle: Bundle | str | Path, rng: np.random.Generator | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.rng = rng or np.random.default_rng(0)
        self._lock = threading.Lock()
        self._session = self._open(self.bundle)
        self.obs_dim = int(self.bundle.manifest["observation"]["dim"])

    @staticmethod
    def _open(bundle: Bundle) -> ort.InferenceSession:
        if bundle.algorithm not in GRADIENT_ALGORITHMS:
            raise BundleError(f"bundle {bundle.path} holds a {bundle.algorithm} policy, not a Gaussian actor")
        return open_session(bundle, [INPUT_NAME], list(GAUSSIAN_OUTPUT_NAMES))

    def reload(self, path: str | Path | None = None) -> None:
        """Load a (new) version of the bundle; the swap happens between ticks under a lock."""
        bundle = load_bundle(path or self.bundle.path)
        session = self._open(bundle)  # slow part, outside the lock
        with self._lock:
            self._session, self.bundle = session, bundle

    def reset(self) -> None:
        """A new episode (the actor is memoryless)."""

    def observe(self, reward: float) -> None:
        """The reward the last action earned (unused: the actor adapts offline, from whole episodes)."""

    def act(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, dict]:
        """One tick: the mean action [act_dim], or mean + exp(log_std) * N(0, I) when not deterministic."""
        batch = np.asarray(obs, dtype=np.float32).reshape(1, self.obs_dim)
        with self._lock:
            mean, log_std = self._session.run(None, {INPUT_NAME: batch})
        action = mean[0] if deterministic else mean[0] + np.exp(log_std[0]) * self.rng.standard_normal(mean.shape[1])
        return action.astype(np.float32), {}


class RL2Runtime:
    """Runs an RL^2 bundle: the hidden state carries across episodes until `reset_trial()` (a new task)."""

    def __init__(self, bundle: Bundle | str | Path) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self._lock = threading.Lock()
        self.recurrent = self._open(self.bundle)
        self._reward: float | None = None

    @staticmethod
    def _open(bundle: Bundle) -> RecurrentRuntime:
        if bundle.algorithm != "rl2":
            raise BundleError(f"bundle {bundle.path} holds a {bundle.algorithm} policy, not RL^2")
        session = open_session(bundle, list(RecurrentRuntime.INPUT_NAMES), list(RecurrentRuntime.OUTPUT_NAMES))
        return RecurrentRuntime(bundle.policy_path, int(bundle.manifest["observation"]["dim"]), session=session)

    def reload(self, path: str | Path | None = None) -> None:
        """Load a (new) version between ticks; it starts a new trial (old memory means nothing to another graph)."""
        bundle = load_bundle(path or self.bundle.path)
        recurrent = self._open(bundle)  # slow part, outside the lock
        with self._lock:
            self.recurrent, self.bundle, self._reward = recurrent, bundle, None

    def reset_trial(self) -> None:
        """A new task: forget everything."""
        with self._lock:
            self.recurrent.reset_trial()
            self._reward = None

    def reset(self) -> None:
        """A new episode of the same trial: the hidden state stays."""
        with self._lock:
            self.recurrent.start_episode()
            self._reward = None

    def observe(self, reward: float) -> None:
        """The reward the last action earned: the next tick's input."""
        self._reward = float(reward)

    def act(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, dict]:
        """One tick of the deterministic recurrent actor (RL^2 explores through its memory, not noise)."""
        with self._lock:
            return self.recurrent.act(obs, self._reward), {}
