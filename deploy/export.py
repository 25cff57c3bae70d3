"""`metactl export`: a training run directory -> a bundle directory (torch + onnx)."""

from __future__ import annotations

import datetime
import logging
import platform
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import yaml

from controller.mapping import ObservationMapping
from controller.mlsh_policy import MLSHPolicy
from controller.robot import RobotSpec, load_robot_spec, robot_spec_from_dict
from controller.rundir import RunDir, atomic_write_bytes, load_torch, save_torch
from deploy.bundle import (
    FORMAT_VERSION,
    FULL_POLICY,
    INPUT_NAME,
    MANIFEST,
    MASTER,
    MASTER_INIT,
    METADATA_KEY,
    OUTPUT_NAMES,
    POLICY,
    archive_current,
    file_sha256,
    manifest_json,
)
from deploy.errors import BundleError


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("metactl", "torch", "onnx", "onnxruntime", "numpy", "pybullet"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def onnx_bytes(policy: MLSHPolicy, manifest: dict[str, Any]) -> bytes:
    """Export the MLSH graph with a dynamic batch and the manifest as metadata; self-contained bytes."""
    return graph_onnx_bytes(policy, (torch.zeros(2, policy.obs_dim),), [INPUT_NAME], list(OUTPUT_NAMES), manifest)


def graph_onnx_bytes(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    manifest: dict[str, Any],
) -> bytes:
    """Export `module(*example)` with a dynamic batch on every input and the manifest as metadata."""
    module.eval()
    batch = torch.export.Dim("batch")
    # The exporter logs a warning per optional torchvision op; none of them is in this graph.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        program = torch.onnx.export(
            module,
            example,
            None,
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes={name: {0: batch} for name in input_names},
        )
    model = program.model_proto
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, manifest_json(manifest)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_manifest(
    spec: RobotSpec, policy: MLSHPolicy, training: dict[str, Any], version: str = "v0", history: list | None = None
) -> dict[str, Any]:
    policy_entry = {
        "num_subpolicies": policy.num_subpolicies,
        "macro_steps": policy.macro_steps,
        "inputs": [INPUT_NAME],
        "outputs": list(OUTPUT_NAMES),
        "config": _plain(policy.config),
    }
    return base_manifest(spec, "mlsh", policy_entry, MASTER, training, version, history)


def base_manifest(
    spec: RobotSpec,
    algorithm: str,
    policy_entry: dict[str, Any],
    adaptable: str | None,
    training: dict[str, Any],
    version: str = "v0",
    history: list | None = None,
) -> dict[str, Any]:
    """The manifest of any algorithm's bundle: robot, observation layout, policy graph, versions, training."""
    mapping = ObservationMapping(spec)
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "history": history or [{"version": version, "created": _now(), "reason": "export"}],
        "robot": spec.name,
        "robot_fingerprint": spec.fingerprint(),
        "robot_spec": spec.to_dict(),
        "joint_names": list(spec.joint_names),
        "control_rate_hz": spec.control_rate_hz,
        "action_scale": spec.action_scale,
        "observation": {"dim": mapping.obs_dim, "hash": mapping.layout_hash, "layout": mapping.layout},
        "action_dim": mapping.act_dim,
        "algorithm": algorithm,
        "policy": _plain(policy_entry),
        "adaptable": adaptable,
        "versions": package_versions(),
        "training": training,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_version_to(directory: Path, policy: MLSHPolicy, manifest: dict[str, Any]) -> Path:
    """Write policy.onnx, master.pt and manifest.yaml (a loadable bundle version) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / POLICY, onnx_bytes(policy, manifest))
    save_torch(policy.master_state_dict(), directory / MASTER)
    atomic_write_bytes(directory / MANIFEST, yaml.safe_dump(manifest, sort_keys=False).encode())
    return directory


def write_version(bundle_dir: Path, policy: MLSHPolicy, manifest: dict[str, Any]) -> None:
    """Write the current version to the bundle root and archive it under versions/."""
    write_version_to(bundle_dir, policy, manifest)
    archive_current(bundle_dir)


def load_policy_file(path: Path) -> MLSHPolicy:
    """Rebuild the full policy from policy.pt (weights only, no code executed)."""
    data = load_torch(path)
    try:
        policy = MLSHPolicy(**data["config"])
        policy.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise BundleError(f"{path} does not hold an MLSH policy: {error}") from error
    return policy


def _wall_time(checkpoint: dict[str, Any], metrics: list[dict[str, float]]) -> float:
    """Training seconds up to the checkpoint; older checkpoints lack the field, so sum the iterations."""
    if "wall_time_s" in checkpoint:
        return float(checkpoint["wall_time_s"])
    rows = metrics[: int(checkpoint.get("num_metric_rows", len(metrics)))]
    previous, total = 0.0, 0.0
    for row in rows:
        if row.get("steps_per_second"):
            total += (row["step"] - previous) / row["steps_per_second"]
        previous = row["step"]
    return total


def export_run(run_dir: str | Path, bundle_dir: str | Path) -> Path:
    """Export the latest checkpoint of a run to a fresh bundle (version v0).

    Raises:
        BundleError: if the run has no checkpoint or the bundle directory already holds a bundle.
    """
    from tqdm import tqdm

    run = RunDir(run_dir)
    bundle_dir = Path(bundle_dir)
    if (bundle_dir / MANIFEST).exists():
        raise BundleError(f"{bundle_dir} already holds a bundle; export to a new directory")
    if not run.has_checkpoint():
        raise BundleError(f"{run.path} has no checkpoint to export")
    with tqdm(total=3, desc="export", leave=False) as bar:
        checkpoint = run.load_checkpoint()
        config = run.read_config()
        spec = (
            load_robot_spec(config["robot"])
            if isinstance(config["robot"], str)
            else robot_spec_from_dict(config["robot"])
        )
        training = _training_record(run, config, checkpoint)
        algorithm = checkpoint.get("algorithm", "mlsh")
        if algorithm != "mlsh":
            from deploy.export_meta import export_meta_checkpoint

            bar.update(1)
            export_meta_checkpoint(checkpoint, spec, training, bundle_dir)
            bar.update(2)
            return bundle_dir
        policy = MLSHPolicy(**checkpoint["policy_config"])
        policy.load_state_dict(checkpoint["policy"])
        bar.update(1)
        manifest = build_manifest(spec, policy, training)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint.get("master_init") is not None:  # a new task's master starts from it, on the robot too
            save_torch(checkpoint["master_init"], bundle_dir / MASTER_INIT)
            manifest["master_init_sha256"] = file_sha256(bundle_dir / MASTER_INIT)
        save_torch({"config": policy.config, "state_dict": policy.state_dict()}, bundle_dir / FULL_POLICY)
        bar.update(1)
        write_version(bundle_dir, policy, manifest)
        bar.update(1)
    return bundle_dir


def _training_record(run: RunDir, config: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `training` entry: command, resolved config, seed, steps, wall time, final return."""
    metrics = run.read_metrics()
    return {
        "command": config.get("command"),
        "config": {k: v for k, v in config.items() if k != "command"},
        "seed": config.get("seed"),
        "run_dir": str(run.path),
        "total_steps": int(checkpoint["total_steps"]),
        "wall_time_s": round(_wall_time(checkpoint, metrics), 1),
        "final_return": metrics[-1].get("episode_return") if metrics else None,
    }
