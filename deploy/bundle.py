"""Bundle: what goes to the robot. numpy + yaml only, so the robot's computer can read it.

Layout of a bundle directory (the root always holds the current version):

    manifest.yaml     robot, joint order, observation layout + hash, rates, algorithm, versions,
                      training command; also stored as ONNX metadata in policy.onnx
    policy.onnx       obs [B, obs_dim] -> master_logits [B, K], sub_actions [B, K, act_dim];
                      normalizers baked in
    master.pt         the adaptable part (MLSH master weights + its normalizer), weights only
    policy.pt         the full policy (weights only), to re-export after adaptation
    versions/vN/      byte-exact copies of manifest.yaml, policy.onnx and master.pt of each version

The manifest's `algorithm` says which graph policy.onnx holds and what is adaptable:

    mlsh                          as above
    maml, meta_sgd,               policy.onnx: obs [B, obs_dim] -> action [B, act_dim] (the mean),
    learned_optimizer             log_std [B, act_dim]; adaptation.pt: the meta-parameters (initial
                                  weights, learned step sizes or optimizer), this version's fast
                                  weights and update-rule state; its sha256 is in the manifest
    rl2                           policy.onnx: obs [B, obs_dim + act_dim + 2], hidden [B, H] ->
                                  action [B, act_dim], hidden_out [B, H]; nothing adaptable on disk
                                  (the adaptation is the hidden state)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.mapping import ObservationMapping
from controller.robot import RobotSpec, robot_spec_from_dict
from deploy.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
POLICY = "policy.onnx"
MASTER = "master.pt"
FULL_POLICY = "policy.pt"
ADAPTATION = "adaptation.pt"
MASTER_INIT = "master_init.pt"
"""MLSH bundles trained with `mlsh.master_init: meta`: the meta-learned master a new task starts from."""
VERSIONED_FILES = (MANIFEST, POLICY, MASTER)
"""An MLSH version's files."""
ARCHIVED_FILES = (MANIFEST, POLICY, MASTER, ADAPTATION)
"""Every file a version of any algorithm may hold (each copied when present)."""
METADATA_KEY = "metactl_manifest"
INPUT_NAME = "obs"
OUTPUT_NAMES = ("master_logits", "sub_actions")
GAUSSIAN_OUTPUT_NAMES = ("action", "log_std")
"""Outputs of a plain Gaussian actor's graph (maml, meta_sgd, learned_optimizer); input `obs`."""
RECURRENT_INPUT_NAMES = ("obs", "hidden")
RECURRENT_OUTPUT_NAMES = ("action", "hidden_out")
GRADIENT_ALGORITHMS = ("maml", "meta_sgd", "learned_optimizer")
BUNDLE_ALGORITHMS = ("mlsh", *GRADIENT_ALGORITHMS, "rl2")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Bundle:
    """A loaded bundle directory."""

    path: Path
    manifest: dict[str, Any]
    spec: RobotSpec

    @property
    def policy_path(self) -> Path:
        return self.path / POLICY

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def algorithm(self) -> str:
        return self.manifest.get("algorithm", "mlsh")

    @property
    def num_subpolicies(self) -> int:
        return int(self.manifest["policy"]["num_subpolicies"])

    @property
    def macro_steps(self) -> int:
        return int(self.manifest["policy"]["macro_steps"])

    def check_robot(self, robot: str, joint_names: list[str] | tuple[str, ...], control_rate_hz: float) -> None:
        """Refuse to drive a robot the bundle was not trained for.

        Raises:
            BundleError: naming what differs (robot, joint order or control rate).
        """
        if robot != self.spec.name:
            raise BundleError(f"bundle {self.path} is for robot '{self.spec.name}', but the robot says it is '{robot}'")
        if list(joint_names) != list(self.spec.joint_names):
            raise BundleError(
                f"bundle {self.path}: joint order differs from the robot's: bundle {self.spec.joint_names}, "
                f"robot {list(joint_names)}"
            )
        if abs(float(control_rate_hz) - self.spec.control_rate_hz) > 1e-6:
            raise BundleError(
                f"bundle {self.path} runs at {self.spec.control_rate_hz} Hz, the robot at {control_rate_hz} Hz"
            )


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True)


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle directory.

    Raises:
        BundleError: missing files, a malformed manifest, a format from another metactl, or an
            observation layout that this code would compute differently.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST}")
    try:
        manifest = yaml.safe_load(manifest_path.read_text())
    except yaml.YAMLError as error:
        raise BundleError(f"{manifest_path} is malformed: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version must be {FORMAT_VERSION}")
    for name in (POLICY,):
        if not (path / name).exists():
            raise BundleError(f"bundle {path} lacks {name}")
    try:
        spec = robot_spec_from_dict(manifest["robot_spec"], where="bundle robot_spec")
    except (KeyError, ValueError) as error:
        raise BundleError(f"{manifest_path}: bad robot_spec: {error}") from error
    mapping = ObservationMapping(spec)
    if manifest.get("observation", {}).get("hash") != mapping.layout_hash:
        raise BundleError(
            f"bundle {path} was exported with observation layout {manifest.get('observation', {}).get('hash')}, "
            f"this metactl computes {mapping.layout_hash}; re-export it with this version"
        )
    algorithm = manifest.get("algorithm", "mlsh")
    if algorithm not in BUNDLE_ALGORITHMS:
        raise BundleError(f"{manifest_path}: algorithm '{algorithm}' unknown; valid: {', '.join(BUNDLE_ALGORITHMS)}")
    if algorithm in GRADIENT_ALGORITHMS:
        check_adaptable_file(path, manifest)
    return Bundle(path, manifest, spec)


def check_adaptable_file(path: Path, manifest: dict[str, Any]) -> Path:
    """The adaptable-state file named by the manifest, present and with the manifest's sha256.

    Raises:
        BundleError: the file is missing, or its bytes are not the ones exported (truncated,
            corrupted, or copied from another bundle or version).
    """
    name, expected = manifest.get("adaptable"), manifest.get("adaptable_sha256")
    if not name or not expected:
        raise BundleError(
            f"{path / MANIFEST}: a {manifest.get('algorithm')} bundle needs adaptable and adaptable_sha256"
        )
    remedy = "restore it (metactl adapt --rollback) or re-export"
    return _checked_file(path / name, expected, f"its adaptable state {name}", remedy)


def load_master_init(bundle: Bundle) -> dict[str, Any] | None:
    """The meta-learned master initialization of an MLSH bundle that carries one (else None), checked
    against the manifest's `master_init_sha256`.

    Raises:
        BundleError: the manifest names the file but it is missing or its bytes are not the exported ones.
    """
    expected = bundle.manifest.get("master_init_sha256")
    if not expected:
        return None
    what = f"its meta-learned master initialization {MASTER_INIT}"
    target = _checked_file(bundle.path / MASTER_INIT, expected, what, "re-export the bundle")
    from controller.rundir import load_torch

    return load_torch(target)


def _checked_file(target: Path, expected: str, what: str, remedy: str) -> Path:
    """`target`, present and with sha256 `expected`; else a BundleError saying what is wrong and `remedy`."""
    if not target.exists():
        raise BundleError(f"bundle {target.parent} lacks {what}")
    actual = file_sha256(target)
    if actual != expected:
        raise BundleError(
            f"{target} is corrupted or belongs to another bundle version: sha256 {actual[:16]}..., "
            f"the manifest expects {expected[:16]}...; {remedy}"
        )
    return target


def list_versions(path: str | Path) -> list[str]:
    versions = Path(path) / "versions"
    if not versions.exists():
        return []
    return sorted((p.name for p in versions.iterdir() if p.is_dir() and p.name[1:].isdigit()), key=lambda v: int(v[1:]))


def archive_current(path: Path) -> None:
    """Copy the root's versioned files into versions/<version>/ (byte-exact)."""
    manifest = yaml.safe_load((path / MANIFEST).read_text())
    target = path / "versions" / manifest["version"]
    target.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED_FILES:
        if (path / name).exists():
            shutil.copy2(path / name, target / name)


def promote(path: Path, version: str) -> None:
    """Make versions/<version>/ the bundle's current files (each file replaced atomically)."""
    source = path / "versions" / version
    if not source.is_dir():
        raise BundleError(f"bundle {path} has no version '{version}'; it has {list_versions(path)}")
    for name in ARCHIVED_FILES:
        if (source / name).exists():
            tmp = path / f".{name}.tmp"
            shutil.copy2(source / name, tmp)
            tmp.replace(path / name)


def next_version(path: str | Path) -> str:
    """A version name not used yet (rejected candidates keep their numbers)."""
    versions = list_versions(path)
    return f"v{int(versions[-1][1:]) + 1}" if versions else "v0"


def rollback(path: str | Path) -> str:
    """Restore the accepted version before the current one, byte for byte; returns its name."""
    path = Path(path)
    history = [entry["version"] for entry in load_bundle(path).manifest.get("history", [])]
    if len(history) < 2:
        raise BundleError(f"bundle {path} is at its first version: there is nothing to roll back to")
    previous = history[-2]
    promote(path, previous)
    return previous
