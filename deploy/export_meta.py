"""Bundles of the non-MLSH algorithms: a Gaussian actor with its adaptable state (MAML, Meta-SGD,
learned optimizer) and a recurrent actor (RL^2). Layout and graphs: deploy/bundle.py's docstring.

The adaptable state (adaptation.pt, weights only) holds what the on-robot inner step needs:
    spec        the learner's description (`controller.learners.learner_from_spec`) and its
                inner-loss settings (`inner`, a `MAMLConfig` as a dict)
    meta        the learner's state_dict: initial weights, normalizer, learned step sizes or
                optimizer weights
    fast        this version's actor weights (the meta-learned initialization at v0)
    rule_state  the update rule's state after this version's inner steps (learned optimizer), or None
    inner_steps inner steps taken from the initialization to reach `fast`
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from controller.errors import ConfigError
from controller.learners import learner_from_spec
from controller.maml import MetaLearner
from controller.policies import GaussianMLPPolicy
from controller.rl2 import GRUPolicy
from controller.robot import RobotSpec
from controller.rundir import atomic_write_bytes, load_torch
from deploy.bundle import (
    ADAPTATION,
    GAUSSIAN_OUTPUT_NAMES,
    GRADIENT_ALGORITHMS,
    INPUT_NAME,
    MANIFEST,
    POLICY,
    RECURRENT_INPUT_NAMES,
    RECURRENT_OUTPUT_NAMES,
    archive_current,
    check_adaptable_file,
)
from deploy.errors import BundleError
from deploy.export import base_manifest, graph_onnx_bytes

ADAPTATION_FORMAT = "metactl-adaptation-1"


class GaussianActorGraph(nn.Module):
    """The exported graph of a Gaussian actor: obs [B, obs_dim] -> action mean, log_std [B, act_dim]."""

    def __init__(self, policy: GaussianMLPPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.policy(obs)  # normalizer inside, exactly once
        return mean, self.policy.clamped_log_std().expand_as(mean)  # as the training distribution


def actor_with(learner: MetaLearner, fast: dict[str, Tensor]) -> GaussianMLPPolicy:
    """A copy of the learner's policy whose adapted parameters are `fast`."""
    policy = copy.deepcopy(learner.module)
    named = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in fast.items():
            named[name].copy_(value)
    return policy


def adaptation_bytes(
    spec: dict[str, Any],
    learner: MetaLearner,
    fast: dict[str, Tensor],
    rule_state: dict[str, Tensor] | None,
    inner_steps: int,
) -> bytes:
    state = {
        "format": ADAPTATION_FORMAT,
        "spec": spec,
        "meta": learner.state_dict(),
        "fast": {name: value.detach().clone() for name, value in fast.items()},
        "rule_state": None if rule_state is None else {k: v.detach().clone() for k, v in rule_state.items()},
        "inner_steps": int(inner_steps),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def write_gradient_version_to(
    directory: Path,
    spec: dict[str, Any],
    learner: MetaLearner,
    fast: dict[str, Tensor],
    rule_state: dict[str, Tensor] | None,
    inner_steps: int,
    manifest: dict[str, Any],
) -> Path:
    """Write adaptation.pt, policy.onnx (the actor with `fast`) and manifest.yaml into `directory`.

    The manifest gets the adaptable state's sha256 (also inside the ONNX metadata), so a swapped or
    damaged adaptation.pt is refused at load.
    """
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    state = adaptation_bytes(spec, learner, fast, rule_state, inner_steps)
    manifest["adaptable"] = ADAPTATION
    manifest["adaptable_sha256"] = hashlib.sha256(state).hexdigest()
    policy = actor_with(learner, fast)
    graph = graph_onnx_bytes(
        GaussianActorGraph(policy),
        (torch.zeros(2, policy.obs_dim),),
        [INPUT_NAME],
        list(GAUSSIAN_OUTPUT_NAMES),
        manifest,
    )
    atomic_write_bytes(directory / ADAPTATION, state)
    atomic_write_bytes(directory / POLICY, graph)
    atomic_write_bytes(directory / MANIFEST, yaml.safe_dump(manifest, sort_keys=False).encode())
    return directory


def write_recurrent_version_to(directory: Path, policy: GRUPolicy, manifest: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, policy.input_dim), policy.initial_hidden(2))
    graph = graph_onnx_bytes(
        policy.export_module(), example, list(RECURRENT_INPUT_NAMES), list(RECURRENT_OUTPUT_NAMES), manifest
    )
    atomic_write_bytes(directory / POLICY, graph)
    atomic_write_bytes(directory / MANIFEST, yaml.safe_dump(manifest, sort_keys=False).encode())
    return directory


def load_adaptation(bundle_dir: Path, manifest: dict[str, Any]) -> tuple[MetaLearner, dict[str, Any]]:
    """The learner (meta-parameters loaded) and the adaptable state of a gradient-based bundle.

    Raises:
        BundleError: the file fails the manifest's checksum, is not a metactl adaptation state, or
            was made for another algorithm or policy shape than the manifest's.
    """
    path = check_adaptable_file(bundle_dir, manifest)
    try:
        state = load_torch(path)
    except Exception as error:  # CheckpointError from load_torch: name it as the bundle's problem
        raise BundleError(f"{path} is corrupted: {error}") from error
    if not isinstance(state, dict) or state.get("format") != ADAPTATION_FORMAT:
        raise BundleError(f"{path} is not a metactl adaptation state ({ADAPTATION_FORMAT})")
    spec = state["spec"]
    if spec.get("algorithm") != manifest["algorithm"] or spec.get("policy_config") != manifest["policy"]["config"]:
        raise BundleError(
            f"{path} was made for {spec.get('algorithm')} with policy {spec.get('policy_config')}, "
            f"the manifest says {manifest['algorithm']} with {manifest['policy']['config']}"
        )
    try:
        learner = learner_from_spec(spec)
        learner.load_state_dict(state["meta"])
        named = dict(learner.module.named_parameters())
        for name, value in state["fast"].items():
            if named[name].shape != value.shape:
                raise BundleError(f"{path}: fast weight '{name}' has shape {tuple(value.shape)}")
    except (ConfigError, KeyError, RuntimeError) as error:
        raise BundleError(f"{path} does not fit this bundle's learner: {error}") from error
    return learner, state


def export_meta_checkpoint(
    checkpoint: dict[str, Any], spec: RobotSpec, training: dict[str, Any], bundle_dir: Path
) -> Path:
    """A fresh bundle (v0) from a MAML / Meta-SGD / learned-optimizer / RL^2 checkpoint."""
    algorithm = checkpoint["algorithm"]
    bundle_dir.mkdir(parents=True, exist_ok=True)
    if algorithm in GRADIENT_ALGORITHMS:
        learner_spec = checkpoint["learner_spec"]
        learner = learner_from_spec(learner_spec)
        learner.load_state_dict(checkpoint["trainer"]["learner"])
        entry = {
            "inputs": [INPUT_NAME],
            "outputs": list(GAUSSIAN_OUTPUT_NAMES),
            "config": learner_spec["policy_config"],
        }
        entry["step_size"] = learner_spec["learner"]["step_size"]
        manifest = base_manifest(spec, algorithm, entry, ADAPTATION, training)
        fast = {name: value.detach() for name, value in learner.fast_parameters().items()}
        write_gradient_version_to(bundle_dir, learner_spec, learner, fast, None, 0, manifest)
    elif algorithm == "rl2":
        policy = GRUPolicy(**checkpoint["policy_config"])
        policy.load_state_dict(checkpoint["trainer"]["policy"])
        entry = {
            "inputs": list(RECURRENT_INPUT_NAMES),
            "outputs": list(RECURRENT_OUTPUT_NAMES),
            "hidden_size": policy.hidden_size,
            "config": checkpoint["policy_config"],
        }
        write_recurrent_version_to(bundle_dir, policy, base_manifest(spec, algorithm, entry, None, training))
    else:
        raise BundleError(f"cannot export algorithm '{algorithm}'")
    archive_current(bundle_dir)
    return bundle_dir
