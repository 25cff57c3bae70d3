"""Bundle export and the onnxruntime runtime: parity with torch, manifest checks, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from deploy.bundle import load_bundle, rollback
from deploy.errors import BundleError
from deploy.export import load_policy_file
from deploy.runtime import PolicyRuntime


def test_onnx_matches_torch_on_1000_observations(tiny_bundle: Path) -> None:
    policy = load_policy_file(tiny_bundle / "policy.pt").eval()
    runtime = PolicyRuntime(tiny_bundle)
    obs = np.random.default_rng(0).normal(0.0, 2.0, size=(1000, runtime.obs_dim)).astype(np.float32)
    logits, actions = runtime.infer(obs)
    with torch.no_grad():
        torch_logits, torch_actions = policy(torch.as_tensor(obs))
    assert np.max(np.abs(logits - torch_logits.numpy())) <= 1e-5
    assert np.max(np.abs(actions - torch_actions.numpy())) <= 1e-5


def test_graph_is_valid_and_carries_the_manifest(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "policy.onnx"))
    onnx.checker.check_model(model)
    assert not (tiny_bundle / "policy.onnx.data").exists()  # weights inside the file
    keys = {entry.key for entry in model.metadata_props}
    assert "metactl_manifest" in keys


def test_normalization_happens_once_inside_the_graph(tiny_bundle: Path) -> None:
    """Feeding raw observations gives the torch result; feeding pre-normalized ones does not."""
    policy = load_policy_file(tiny_bundle / "policy.pt").eval()
    runtime = PolicyRuntime(tiny_bundle)
    obs = np.random.default_rng(1).normal(3.0, 2.0, size=(8, runtime.obs_dim)).astype(np.float32)
    with torch.no_grad():
        expected = policy(torch.as_tensor(obs))[1].numpy()
        normalized = policy.sub_normalizer(torch.as_tensor(obs)).numpy()
    assert np.allclose(runtime.infer(obs)[1], expected, atol=1e-5)
    assert not np.allclose(runtime.infer(normalized)[1], expected, atol=1e-3)


def test_runtime_picks_an_option_every_macro_step(tiny_bundle: Path) -> None:
    runtime = PolicyRuntime(tiny_bundle)
    obs = np.zeros(runtime.obs_dim, dtype=np.float32)
    chose = [runtime.act(obs)[1]["chose"] for _ in range(3 * runtime.macro_steps)]
    assert [i for i, c in enumerate(chose) if c] == [0, runtime.macro_steps, 2 * runtime.macro_steps]


def test_edited_manifest_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["action_scale"] = 0.5
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match="ONNX metadata does not match"):
        PolicyRuntime(bundle)


def test_robot_mismatch_messages(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    joints = list(bundle.spec.joint_names)
    with pytest.raises(BundleError, match="is for robot 'a1'"):
        bundle.check_robot("laikago", joints, 50)
    with pytest.raises(BundleError, match="joint order"):
        bundle.check_robot("a1", joints[3:] + joints[:3], 50)
    with pytest.raises(BundleError, match="Hz"):
        bundle.check_robot("a1", joints, 500)
    bundle.check_robot("a1", joints, 50)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.yaml").write_text("format_version: [1\n")
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(tmp_path)


def test_corrupt_adaptation_state_is_refused_and_bundle_unchanged(tiny_bundle: Path, tmp_path: Path) -> None:
    from controller.errors import CheckpointError
    from controller.rundir import load_torch

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = (bundle / "master.pt").read_bytes()
    (bundle / "master.pt").write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="corrupt"):
        load_torch(bundle / "master.pt")
    with pytest.raises(BundleError):
        rollback(bundle)
    assert before == {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}


def test_optimized_graph_is_saved_and_reused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    obs = np.random.default_rng(2).normal(size=(4, 47)).astype(np.float32)
    first = PolicyRuntime(bundle).infer(obs)
    (cache,) = bundle.glob(".policy.*.optimized.onnx")
    stamp = cache.stat().st_mtime_ns
    second = PolicyRuntime(bundle).infer(obs)  # loaded from the cache, not re-optimized
    assert cache.stat().st_mtime_ns == stamp
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_promote_then_rollback_restores_the_exact_bytes(tiny_bundle: Path, tmp_path: Path) -> None:
    import copy

    from deploy.bundle import VERSIONED_FILES, list_versions, load_bundle, next_version, promote
    from deploy.export import write_version_to

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = {name: (bundle / name).read_bytes() for name in VERSIONED_FILES}
    policy = load_policy_file(bundle / "policy.pt")
    with torch.no_grad():
        for parameter in policy.master.parameters():
            parameter.add_(0.1)  # a different master, as adaptation would make
    manifest = copy.deepcopy(load_bundle(bundle).manifest)
    candidate = next_version(bundle)
    manifest["version"] = candidate
    manifest["history"] = [*manifest["history"], {"version": candidate, "reason": "test"}]
    write_version_to(bundle / "versions" / candidate, policy, manifest)
    promote(bundle, candidate)
    assert load_bundle(bundle).version == "v1" and (bundle / "master.pt").read_bytes() != before["master.pt"]
    assert rollback(bundle) == "v0"
    assert {name: (bundle / name).read_bytes() for name in VERSIONED_FILES} == before
    assert list_versions(bundle) == ["v0", "v1"]  # every version is kept


def test_new_policy_loads_off_the_control_thread_and_swaps_between_ticks(tiny_bundle: Path, tmp_path: Path) -> None:
    import threading

    from deploy.bundle import MASTER, promote
    from deploy.export import write_version_to

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    runtime = PolicyRuntime(bundle)
    policy = load_policy_file(bundle / "policy.pt")
    with torch.no_grad():
        for parameter in policy.master.parameters():
            parameter.add_(0.5)
    manifest = dict(runtime.bundle.manifest, version="v1")
    manifest["history"] = [*manifest["history"], {"version": "v1", "reason": "test"}]
    write_version_to(bundle / "versions" / "v1", policy, manifest)
    promote(bundle, "v1")
    obs = np.zeros(runtime.obs_dim, dtype=np.float32)
    errors: list[BaseException] = []
    stop = threading.Event()

    def control_loop() -> None:  # ticks keep coming while the new version loads
        try:
            while not stop.is_set():
                runtime.act(obs)
        except BaseException as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    thread = threading.Thread(target=control_loop)
    thread.start()
    runtime.reload(bundle)
    stop.set()
    thread.join()
    assert not errors
    assert runtime.bundle.version == "v1"
    assert (bundle / MASTER).exists()
    with torch.no_grad():
        expected = policy(torch.as_tensor(obs)[None])[0].numpy()
    np.testing.assert_allclose(runtime.infer(obs)[0], expected, atol=1e-5)
