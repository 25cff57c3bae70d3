"""Bundles of MAML-family actors in process: ONNX parity with torch, and refusals of a damaged or
mismatched adaptable state that leave the bundle's bytes as they were."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from controller.learners import learner_from_spec
from controller.meta_trainer import MAMLConfig
from controller.robot import load_robot_spec
from deploy.adapt import adapt
from deploy.bundle import load_bundle
from deploy.errors import BundleError
from deploy.export_meta import actor_with, export_meta_checkpoint, load_adaptation
from deploy.runtime import GaussianRuntime, open_runtime


def learner_spec(algorithm: str, hidden: list[int]) -> dict:
    spec = load_robot_spec("a1")
    from controller.mapping import ObservationMapping

    mapping = ObservationMapping(spec)
    return {
        "algorithm": algorithm,
        "policy_config": {
            "obs_dim": mapping.obs_dim,
            "act_dim": mapping.act_dim,
            "hidden": hidden,
            "activation": "tanh",
            "init_log_std": -1.0,
            "normalize": True,
        },
        "learner": {"step_size": 0.05, "first_order": False, "optimizer_hidden_size": 4, "optimizer_output_scale": 0.1},
        "inner": {"gamma": 0.99},
    }


def make_bundle(directory: Path, algorithm: str = "maml", hidden: list[int] | None = None) -> Path:
    """A bundle exported from a checkpoint of an untrained learner (with non-trivial normalizer statistics)."""
    spec = learner_spec(algorithm, hidden or [16])
    torch.manual_seed(0)
    learner = learner_from_spec(spec)
    learner.module.update_normalizer(torch.randn(200, spec["policy_config"]["obs_dim"]) * 3.0 + 1.0)
    checkpoint = {"algorithm": algorithm, "learner_spec": spec, "trainer": {"learner": learner.state_dict()}}
    training = {"command": "test", "total_steps": 0}
    return export_meta_checkpoint(checkpoint, load_robot_spec("a1"), training, directory)


def digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "learned_optimizer"])
def test_gaussian_actor_onnx_matches_torch(tmp_path: Path, algorithm: str) -> None:
    bundle = make_bundle(tmp_path / "bundle", algorithm)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert manifest["algorithm"] == algorithm and manifest["adaptable"] == "adaptation.pt"
    assert (bundle / "versions" / "v0" / "adaptation.pt").read_bytes() == (bundle / "adaptation.pt").read_bytes()
    runtime = open_runtime(bundle)
    assert isinstance(runtime, GaussianRuntime)
    learner, state = load_adaptation(bundle, manifest)
    policy = actor_with(learner, state["fast"]).eval()
    obs = np.random.default_rng(0).normal(1.0, 3.0, size=(200, runtime.obs_dim)).astype(np.float32)
    with torch.no_grad():
        expected = policy(torch.as_tensor(obs)).numpy()
    actions = np.stack([runtime.act(row)[0] for row in obs])
    assert np.max(np.abs(actions - expected)) <= 1e-5  # the normalizer is in the graph, applied once
    sampled = np.stack([runtime.act(obs[0], deterministic=False)[0] for _ in range(500)])
    np.testing.assert_allclose(sampled.std(axis=0), np.exp(-1.0), rtol=0.15)  # log_std from the graph


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "from another bundle"])
def test_damaged_adaptation_state_is_refused_and_bundle_unchanged(tmp_path: Path, damage: str) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    state = bundle / "adaptation.pt"
    data = state.read_bytes()
    if damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        state.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        other = make_bundle(tmp_path / "other", hidden=[8])
        shutil.copy(other / "adaptation.pt", state)
    before = digest(bundle)
    with pytest.raises(BundleError, match="adaptation.pt is corrupted or belongs to another bundle version"):
        load_bundle(bundle)
    # The adapter refuses before it opens the port (loop:// would otherwise answer nothing).
    with pytest.raises(BundleError, match="adaptation.pt"):
        adapt(bundle, "loop://", num_episodes=1, progress=False)
    assert digest(bundle) == before and not (bundle / "versions" / "v1").exists()


def test_adaptation_state_for_another_policy_is_refused(tmp_path: Path) -> None:
    """Even with a matching checksum, a state made for another algorithm or shape does not load."""
    bundle = make_bundle(tmp_path / "bundle")
    other = make_bundle(tmp_path / "other", "meta_sgd", hidden=[8])
    shutil.copy(other / "adaptation.pt", bundle / "adaptation.pt")
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["adaptable_sha256"] = hashlib.sha256((bundle / "adaptation.pt").read_bytes()).hexdigest()
    with pytest.raises(BundleError, match="was made for meta_sgd"):
        load_adaptation(bundle, manifest)


def test_inner_config_round_trips(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    _, state = load_adaptation(bundle, load_bundle(bundle).manifest)
    assert state["inner_steps"] == 0 and state["rule_state"] is None
    assert MAMLConfig(**state["spec"]["inner"]).gamma == 0.99


def test_manifest_records_algorithm_and_policy_graph(tmp_path: Path) -> None:
    manifest = load_bundle(make_bundle(tmp_path / "bundle", "learned_optimizer")).manifest
    assert manifest["policy"]["outputs"] == ["action", "log_std"]
    assert (
        manifest["adaptable_sha256"] == hashlib.sha256((tmp_path / "bundle" / "adaptation.pt").read_bytes()).hexdigest()
    )


def random_episodes(obs_dim: int, act_dim: int, num_episodes: int = 2, seed: int = 0) -> list:
    from controller.adaptation import Episode

    rng = np.random.default_rng(seed)
    episodes = []
    for index in range(num_episodes):
        length = 15 + 5 * index  # unequal lengths: the batch is padded
        episode = Episode()
        episode.obs = list(rng.normal(size=(length, obs_dim)).astype(np.float32))
        episode.actions = list(rng.normal(size=(length, act_dim)).astype(np.float32))
        episode.rewards = list(rng.normal(size=length))
        episodes.append(episode)
    return episodes


def test_learned_optimizer_state_carries_from_version_to_version(tmp_path: Path) -> None:
    """v0 -> v1 -> v2: each inner step starts from the previous version's fast weights and rule state."""
    from deploy.adapt_gradient import adapt_fast_weights
    from deploy.export_meta import write_gradient_version_to

    bundle = make_bundle(tmp_path / "bundle", "learned_optimizer")
    manifest = load_bundle(bundle).manifest
    learner, state = load_adaptation(bundle, manifest)
    config = MAMLConfig(**state["spec"]["inner"])
    dims = manifest["policy"]["config"]
    fast, rule_state, stats = adapt_fast_weights(
        learner, state["fast"], None, random_episodes(dims["obs_dim"], dims["act_dim"]), config
    )
    assert any(not torch.equal(fast[name], state["fast"][name]) for name in fast)
    assert set(rule_state) == set(fast) and stats["inner_steps"] == 1.0
    version = write_gradient_version_to(tmp_path / "v1", state["spec"], learner, fast, rule_state, 1, dict(manifest))
    learner, state = load_adaptation(version, yaml.safe_load((version / "manifest.yaml").read_text()))
    assert state["inner_steps"] == 1
    for name in fast:
        torch.testing.assert_close(state["fast"][name], fast[name], rtol=0, atol=0)
        torch.testing.assert_close(state["rule_state"][name], rule_state[name], rtol=0, atol=0)
    again, _, _ = adapt_fast_weights(
        learner, state["fast"], state["rule_state"], random_episodes(dims["obs_dim"], dims["act_dim"], seed=1), config
    )
    assert any(not torch.equal(again[name], fast[name]) for name in fast)


def episodes_returning(*values: float) -> list:
    from controller.adaptation import Episode

    return [Episode(rewards=[value]) for value in values]


@pytest.mark.parametrize("after", [5.0, 4.0, 3.9])
def test_candidate_is_kept_only_if_not_worse_and_rollback_restores_bytes(tmp_path: Path, after: float) -> None:
    """Evaluation return 4.0 before; a candidate scoring 5.0 or 4.0 lands (and rolls back), 3.9 never does."""
    from deploy.adapt import candidate_manifest, keep_if_not_worse
    from deploy.bundle import next_version, rollback
    from deploy.export_meta import write_gradient_version_to

    bundle_dir = make_bundle(tmp_path / "bundle")
    bundle = load_bundle(bundle_dir)
    v0 = digest(bundle_dir)
    learner, state = load_adaptation(bundle_dir, bundle.manifest)
    fast = {name: value + 0.01 for name, value in state["fast"].items()}
    candidate = next_version(bundle_dir)
    manifest = candidate_manifest(bundle, candidate, 2, {"inner_steps": 1.0})
    candidate_dir = write_gradient_version_to(
        bundle_dir / "versions" / candidate, state["spec"], learner, fast, None, 1, manifest
    )
    runtime = GaussianRuntime(bundle)
    result = keep_if_not_worse(
        bundle,
        runtime,
        candidate,
        candidate_dir,
        episodes_returning(4.0),
        episodes_returning(1.0, 2.0),
        episodes_returning(after),
        0.1,
    )
    assert result.kept == (after >= 4.0) and result.candidate == "v1"
    if result.kept:
        assert load_bundle(bundle_dir).version == "v1" and runtime.bundle.version == "v1"  # swapped in
        assert rollback(bundle_dir) == "v0"
    current = {name: value for name, value in digest(bundle_dir).items() if not name.startswith("versions")}
    assert current == {name: value for name, value in v0.items() if not name.startswith("versions")}  # v0's bytes


def test_rl2_bundle_runtime_carries_memory_like_torch(tmp_path: Path) -> None:
    from controller.mapping import ObservationMapping
    from controller.rl2 import GRUPolicy
    from deploy.runtime import RL2Runtime

    mapping = ObservationMapping(load_robot_spec("a1"))
    torch.manual_seed(1)
    policy = GRUPolicy(mapping.obs_dim, mapping.act_dim, hidden_size=8, head_hidden=[8]).eval()
    policy.update_normalizer(torch.randn(100, policy.input_dim) * 2.0 + 1.0)
    checkpoint = {"algorithm": "rl2", "policy_config": policy.config, "trainer": {"policy": policy.state_dict()}}
    bundle = export_meta_checkpoint(checkpoint, load_robot_spec("a1"), {"command": "test"}, tmp_path / "bundle")
    assert load_bundle(bundle).manifest["adaptable"] is None
    runtime = open_runtime(bundle)
    assert isinstance(runtime, RL2Runtime)
    rng = np.random.default_rng(0)
    hidden = policy.initial_hidden(1)
    runtime.reset_trial()
    for episode in range(2):
        runtime.reset()  # a new episode of the same trial: memory kept
        previous_action, reward, done = torch.zeros(1, mapping.act_dim), torch.zeros(1), torch.tensor([episode > 0])
        for _ in range(5):
            obs = rng.normal(size=mapping.obs_dim).astype(np.float32)
            action, _ = runtime.act(obs)
            with torch.no_grad():
                step_input = policy.step_input(torch.as_tensor(obs)[None], previous_action, reward, done)
                mean, _, hidden = policy(step_input, hidden)
            np.testing.assert_allclose(action, mean[0].numpy(), atol=1e-5)
            reward_value = float(rng.normal())
            runtime.observe(reward_value)
            previous_action, reward, done = mean.clamp(-1, 1), torch.tensor([reward_value]), torch.tensor([False])
    runtime.reload()
    assert np.all(runtime.recurrent.hidden == 0)  # a reloaded version starts a new trial
