"""Batch-1 inference latency: onnxruntime vs torch eager vs TorchScript, for three policy graphs.

    python benchmarks/inference_latency.py [--quick] [--json] [--bundle DIR]

Graphs (observation 47 floats, action 12, as for the A1):

    mlp    GaussianMLPPolicy, hidden 256-256 (normalizer inside), output `actions` [1, 12]
    mlsh   the MLSH bundle as shipped: `policy.onnx` for onnxruntime, `policy.pt` for torch. Without
           --bundle, a freshly initialized policy shaped like configs/a1_terrain.yaml (4 sub-policies
           64-64, master 32-32) is exported to a temporary bundle the way `metactl export` does it.
    gru    a GRU actor (GRU 64 + linear head, normalizer inside) with the hidden state as an explicit
           input and output, exported with torch.onnx.export(dynamo=True)

Backends: onnxruntime (session from `deploy.runtime.make_session`, `session.run` with the input
array made once), torch eager (`torch.no_grad()`, `torch.set_num_threads(1)`), TorchScript
(`torch.jit.trace`, `torch.jit.freeze`, `torch.jit.optimize_for_inference`). Each call is timed
alone with `time.perf_counter_ns` after a warm-up; backends are interleaved in rounds so a busy
machine slows all of them alike. For the MLSH graph, onnxruntime's latency options are measured too
(memory arena and pattern, spinning, optimization level, OrtValue and IOBinding calls, and the
`PolicyRuntime.infer` the control loop calls).

`--fifo` times under SCHED_FIFO, as a robot computer would run its control loop, so other
processes on the core cannot preempt a call (p99 on a shared machine is otherwise mostly
preemption). Prints a Markdown table, then one JSON object as the last line (`--json`: the JSON
line alone). Targets for the MLSH bundle: ort p99 <= 60 us, speedup_vs_torch >= 2.5,
speedup_vs_torchscript >= 1.8.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import yaml
from torch import Tensor, nn

from controller.mapping import ObservationMapping
from controller.mlsh_policy import MLSHPolicy
from controller.networks import RunningNormalizer
from controller.policies import GaussianMLPPolicy
from controller.robot import load_robot_spec
from controller.rundir import save_torch
from deploy.bundle import FULL_POLICY, INPUT_NAME, POLICY
from deploy.export import build_manifest, load_policy_file, write_version
from deploy.runtime import PolicyRuntime, make_session

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"ort_p99_us": 60.0, "speedup_vs_torch": 2.5, "speedup_vs_torchscript": 1.8}
BACKENDS = ("ort", "torch", "torchscript")


class GRUActor(nn.Module):
    """A small recurrent actor: normalizer, one GRU layer, a tanh head; hidden state in and out.

    Args:
        obs_dim: Observation size.
        act_dim: Action size.
        hidden_size: GRU state size.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_size: int = 64) -> None:
        super().__init__()
        self.normalizer = RunningNormalizer(obs_dim)
        self.gru = nn.GRU(obs_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, act_dim)
        self.hidden_size = hidden_size

    def forward(self, obs: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """obs [B, obs_dim], hidden [B, H] -> actions [B, act_dim], next hidden [B, H]."""
        out, next_hidden = self.gru(self.normalizer(obs)[:, None, :], hidden[None])
        return torch.tanh(self.head(out[:, 0])), next_hidden[0]


@dataclass
class Graph:
    """One policy graph in its three forms, with batch-1 example inputs."""

    name: str
    module: nn.Module
    onnx_path: Path
    inputs: dict[str, np.ndarray]


def export_onnx(module: nn.Module, inputs: dict[str, np.ndarray], output_names: list[str], path: Path) -> Path:
    """torch.onnx.export(dynamo=True), dynamic batch, self-contained file at `path`."""
    example = tuple(torch.from_numpy(np.repeat(array, 2, axis=0)) for array in inputs.values())
    batch = torch.export.Dim("batch")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            example,
            None,
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=list(inputs),
            output_names=output_names,
            dynamic_shapes={name: {0: batch} for name in inputs},
        )
    path.write_bytes(program.model_proto.SerializeToString())
    return path


def fresh_bundle(directory: Path, seed: int = 0) -> Path:
    """A bundle of a fresh MLSH policy shaped like configs/a1_terrain.yaml, written as `metactl export` does."""
    config = yaml.safe_load((ROOT / "configs" / "a1_terrain.yaml").read_text())
    spec = load_robot_spec(config["robot"])
    mapping = ObservationMapping(spec)
    torch.manual_seed(seed)
    policy = MLSHPolicy(mapping.obs_dim, mapping.act_dim, **config["policy"])
    manifest = build_manifest(spec, policy, {"command": "benchmarks: freshly initialized MLSH policy"})
    directory.mkdir(parents=True, exist_ok=True)
    save_torch({"config": policy.config, "state_dict": policy.state_dict()}, directory / FULL_POLICY)
    write_version(directory, policy, manifest)
    return directory


def build_graphs(bundle: Path, workdir: Path, obs_dim: int = 47, act_dim: int = 12) -> list[Graph]:
    torch.manual_seed(0)
    obs = np.random.default_rng(0).normal(size=(1, obs_dim)).astype(np.float32)
    policy = load_policy_file(bundle / FULL_POLICY).eval()
    if policy.obs_dim != obs_dim:
        raise SystemExit(f"bundle {bundle} has obs_dim {policy.obs_dim}; this benchmark is set up for {obs_dim}")
    mlp = GaussianMLPPolicy(obs_dim, act_dim, hidden=(256, 256)).eval()
    gru = GRUActor(obs_dim, act_dim).eval()
    gru_inputs = {"obs": obs, "hidden": np.zeros((1, gru.hidden_size), np.float32)}
    return [
        Graph("mlp", mlp, export_onnx(mlp, {"obs": obs}, ["actions"], workdir / "mlp.onnx"), {"obs": obs}),
        Graph("mlsh", policy, bundle / POLICY, {INPUT_NAME: obs}),
        Graph("gru", gru, export_onnx(gru, gru_inputs, ["actions", "hidden_out"], workdir / "gru.onnx"), gru_inputs),
    ]


def torchscript(module: nn.Module, example: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        traced = torch.jit.trace(module.eval(), example)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def runners(graph: Graph) -> dict[str, Callable[[], object]]:
    """One zero-argument call per backend, all inputs made once up front."""
    session = make_session(graph.onnx_path)
    feeds = dict(graph.inputs)
    tensors = tuple(torch.from_numpy(array.copy()) for array in graph.inputs.values())
    scripted = torchscript(graph.module, tensors)
    module = graph.module

    def eager() -> object:
        with torch.no_grad():
            return module(*tensors)

    def script() -> object:
        with torch.no_grad():
            return scripted(*tensors)

    return {"ort": lambda: session.run(None, feeds), "torch": eager, "torchscript": script}


def session_with(path: Path, **settings: Any) -> ort.InferenceSession:
    """`make_session`'s options with some changed: `arena`, `mem_pattern`, `spinning`, `level`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = settings.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.enable_cpu_mem_arena = settings.get("arena", True)
    options.enable_mem_pattern = settings.get("mem_pattern", True)
    if "spinning" in settings:
        options.add_session_config_entry("session.intra_op.allow_spinning", settings["spinning"])
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_variants(graph: Graph, bundle: Path) -> dict[str, Callable[[], object]]:
    """Ways to call onnxruntime on the MLSH graph; the first is the `ort` backend of the main table."""
    obs = graph.inputs[INPUT_NAME]
    base = make_session(graph.onnx_path)
    output_names = [node.name for node in base.get_outputs()]
    variants: dict[str, Callable[[], object]] = {
        "make_session, run(None, feeds)": lambda: base.run(None, {INPUT_NAME: obs})
    }
    variants["run(output names, feeds)"] = lambda: base.run(output_names, {INPUT_NAME: obs})
    for name, settings in (
        ("no memory arena", {"arena": False}),
        ("no memory pattern", {"mem_pattern": False}),
        ("no arena, no pattern", {"arena": False, "mem_pattern": False}),
        ("allow_spinning=0", {"spinning": "0"}),
        ("ORT_ENABLE_EXTENDED", {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}),
        ("ORT_ENABLE_BASIC", {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}),
    ):
        session = session_with(graph.onnx_path, **settings)
        variants[name] = lambda session=session: session.run(None, {INPUT_NAME: obs})
    obs_value = ort.OrtValue.ortvalue_from_numpy(obs)
    variants["run_with_ort_values (input OrtValue made once)"] = lambda: base.run_with_ort_values(
        output_names, {INPUT_NAME: obs_value}
    )
    # IOBinding: the input array and both output arrays are bound once and reused in place.
    obs_buffer = obs.copy()
    policy = graph.module
    shapes = ((1, policy.num_subpolicies), (1, policy.num_subpolicies, policy.act_dim))
    outputs = [np.zeros(shape, np.float32) for shape in shapes]
    binding = base.io_binding()
    binding.bind_cpu_input(INPUT_NAME, obs_buffer)
    for name, array in zip(output_names, outputs):
        binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
    variants["IOBinding, buffers bound once"] = lambda: base.run_with_iobinding(binding)

    def bound_infer() -> tuple[np.ndarray, np.ndarray]:
        obs_buffer[0] = obs[0]
        base.run_with_iobinding(binding)
        return outputs[0].copy(), outputs[1].copy()

    variants["IOBinding + copy obs in and outputs out"] = bound_infer
    run_options = ort.RunOptions()
    variants["IOBinding, passing a RunOptions"] = lambda: base.run_with_iobinding(binding, run_options)
    runtime = PolicyRuntime(bundle)
    variants["PolicyRuntime.infer (deploy path)"] = lambda: runtime.infer(obs[0])
    return variants


def time_calls(calls: dict[str, Callable[[], object]], num_calls: int, rounds: int, warmup: int) -> dict[str, dict]:
    """Per-call latency of each callable, interleaved in `rounds` blocks; p50/p99/max in microseconds."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    per_round = max(1, num_calls // rounds)
    samples = {name: np.empty(per_round * rounds, dtype=np.int64) for name in calls}
    clock = time.perf_counter_ns
    for round_index in range(rounds):
        offset = round_index * per_round
        for name, call in calls.items():
            out = samples[name]
            for index in range(offset, offset + per_round):
                start = clock()
                call()
                out[index] = clock() - start
    results = {}
    for name, values in samples.items():
        p50, p99 = np.percentile(values, [50, 99]) / 1e3
        results[name] = {"p50_us": round(float(p50), 2), "p99_us": round(float(p99), 2), "max_us": values.max() / 1e3}
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| graph | backend | p50 (us) | p99 (us) | speedup of ort at p50 |",
        "|---|---|---:|---:|---:|",
    ]
    for graph, numbers in results["graphs"].items():
        for backend in BACKENDS:
            row = numbers[backend]
            speedup = "" if backend == "ort" else f"{row['p50_us'] / numbers['ort']['p50_us']:.2f}x"
            lines.append(f"| {graph} | {backend} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {speedup} |")
    lines += ["", "| onnxruntime call on the MLSH graph | p50 (us) | p99 (us) |", "|---|---:|---:|"]
    lines += [
        f"| {name} | {row['p50_us']:.1f} | {row['p99_us']:.1f} |" for name, row in results["ort_variants"].items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a few seconds)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--bundle", type=Path, help="bundle directory with policy.onnx and policy.pt (default: fresh)")
    parser.add_argument("--fifo", action="store_true", help="time under SCHED_FIFO (root or CAP_SYS_NICE)")
    args = parser.parse_args(argv)
    num_calls, rounds, warmup = (2000, 4, 200) if args.quick else (20000, 10, 1000)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    results: dict[str, Any] = {
        "quick": args.quick,
        "calls": num_calls,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    with tempfile.TemporaryDirectory(prefix="metactl-bench-") as tmp:
        workdir = Path(tmp)
        bundle = args.bundle if args.bundle is not None else fresh_bundle(workdir / "bundle")
        if not (bundle / FULL_POLICY).exists():
            raise SystemExit(f"{bundle} has no {FULL_POLICY}: pass a bundle made by `metactl export`")
        results["bundle"] = str(args.bundle) if args.bundle is not None else "fresh (a1_terrain shapes)"
        graphs = build_graphs(bundle, workdir)
        if args.fifo:
            # Only the timing runs real-time: other processes on this core wait until it is done.
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
            except OSError as error:
                raise SystemExit(
                    f"--fifo: SCHED_FIFO refused ({error.strerror}); run as root or with CAP_SYS_NICE"
                ) from None
        results["scheduling"] = "SCHED_FIFO 50" if args.fifo else "default"
        results["graphs"] = {}
        for graph in graphs:
            numbers = time_calls(runners(graph), num_calls, rounds, warmup)
            numbers["speedup_vs_torch"] = round(numbers["torch"]["p50_us"] / numbers["ort"]["p50_us"], 2)
            numbers["speedup_vs_torchscript"] = round(numbers["torchscript"]["p50_us"] / numbers["ort"]["p50_us"], 2)
            results["graphs"][graph.name] = numbers
        mlsh = next(graph for graph in graphs if graph.name == "mlsh")
        results["ort_variants"] = time_calls(ort_variants(mlsh, bundle), num_calls, rounds, warmup)
        if args.fifo:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    shipped = results["graphs"]["mlsh"]
    results |= {
        "ort_p50_us": shipped["ort"]["p50_us"],
        "ort_p99_us": shipped["ort"]["p99_us"],
        "torch_p50_us": shipped["torch"]["p50_us"],
        "torchscript_p50_us": shipped["torchscript"]["p50_us"],
        "speedup_vs_torch": shipped["speedup_vs_torch"],
        "speedup_vs_torchscript": shipped["speedup_vs_torchscript"],
        "targets": TARGETS,
    }
    results["meets_targets"] = {
        "ort_p99_us": results["ort_p99_us"] <= TARGETS["ort_p99_us"],
        "speedup_vs_torch": results["speedup_vs_torch"] >= TARGETS["speedup_vs_torch"],
        "speedup_vs_torchscript": results["speedup_vs_torchscript"] >= TARGETS["speedup_vs_torchscript"],
    }
    results["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    if not args.json:
        print(markdown(results))
    print(json.dumps(results, default=float))
    return results


if __name__ == "__main__":
    main()
