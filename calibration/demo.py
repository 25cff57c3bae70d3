"""`metactl demo`: the three jobs on one machine, with no robot.

Starts `metactl emulate` in its own process on a held-out task (dynamics the policy never saw and
the host is not told), deploys the bundle over the pseudo-terminal, adapts it with K episodes,
and prints a before/after table. The shipped bundle is used unless `--quick` trains a tiny one.
A `--bundle` of any algorithm works: MLSH and the gradient-based meta-learners write a candidate
version that is kept or rejected; RL^2 adapts in its hidden state, so its table compares a fresh
memory with the same trial after K episodes, and nothing is written.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from controller.errors import MetactlError

if TYPE_CHECKING:  # deploy is imported when the demo runs, not when the CLI starts
    from deploy.adapt import AdaptResult

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = ROOT / "bundles" / "a1_terrain"
HELDOUT_TASK = ROOT / "configs" / "tasks" / "a1_heldout_slippery.yaml"
QUICK_CONFIG = ROOT / "configs" / "a1_quick.yaml"
UPDATES = {"mlsh": "master update", "maml": "inner step", "meta_sgd": "inner step", "learned_optimizer": "inner step"}
"""What each algorithm does with the K episodes when it writes a candidate version (RL^2 writes none)."""


class Emulated:
    """`metactl emulate ARGS` in a child process; `.port` is its port path once started.

    Also a context manager: `with Emulated("--lockstep") as port: ...` stops it on exit.
    """

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "calibration.cli", "emulate", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        # PyBullet's C code may print its own lines first; the port is on the line starting "PORT ".
        for _ in range(20):
            line = self.process.stdout.readline()
            if line.startswith("PORT "):
                self.port = line.split(maxsplit=1)[1].strip()
                return
            if not line:
                break
        self.stop()
        raise MetactlError(f"the emulator ({' '.join(args)}) exited before printing its PORT line")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> str:
        return self.port

    def __exit__(self, *exc_info) -> None:
        self.stop()


def run_demo(
    *,
    quick: bool = False,
    k: int = 3,
    seconds: float = 10.0,
    lockstep: bool = True,
    bundle: str | None = None,
    task: str | None = None,
    plot: str | Path = "demo_adaptation.png",
    report=print,
) -> dict:
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="metactl-demo-"))
    try:
        if quick:
            from deploy.export import export_run
            from sim.training import train

            report("training a tiny policy (--quick) ...")
            run = train(QUICK_CONFIG, run_dir=workdir / "run", progress=True)
            source = export_run(run.path, workdir / "trained-bundle")
        else:
            source = Path(bundle) if bundle else SHIPPED_BUNDLE
            if not (source / "manifest.yaml").exists():
                raise MetactlError(f"no bundle at {source}; run `metactl demo --quick` or pass --bundle")
        # Adapt a copy: the shipped bundle stays as it is.
        working = workdir / "bundle"
        shutil.copytree(source, working)
        task_file = Path(task) if task else HELDOUT_TASK
        from deploy.adapt import adapt
        from deploy.bundle import load_bundle

        version_before = load_bundle(working).version

        emulator_args = ["--task", str(task_file)] + (["--lockstep"] if lockstep else [])
        with Emulated(*emulator_args) as port:
            report(f"emulated robot on {port} with held-out task {task_file.name}")
            result = adapt(working, port, num_episodes=k, eval_episodes=1, seconds=seconds)
        plot = Path(plot).resolve()
        shutil.copy(result.plot, plot)
        summary = {
            "algorithm": result.algorithm,
            "return_before": round(result.return_before, 2),
            "return_after": round(result.return_after, 2),
            "episodes": k,
            "kept": result.kept,
            "version": result.version,
            "adaptation_returns": [round(value, 2) for value in result.adaptation_returns],
            "update_seconds": round(result.update_seconds, 3),
            "task": task_file.name,
            "bundle": "quick" if quick else str(source),
            "plot": str(plot),
            "seconds": round(time.perf_counter() - start, 1),
        }
        report("")
        for line in before_after_table(result, k, version_before):
            report(line)
        report(f"\nadaptation episodes: {', '.join(f'{r:.1f}' for r in result.adaptation_returns)}; plot: {plot}")
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def before_after_table(result: AdaptResult, k: int, version_before: str) -> list[str]:
    """The demo's Markdown table for an `AdaptResult`, worded for the bundle's algorithm."""
    lines = ["| policy | return (eval episode) |", "|---|---:|"]
    episodes = f"{k} episode{'' if k == 1 else 's'}"
    if result.algorithm == "rl2":
        lines.append(f"| fresh memory ({version_before}, new trial) | {result.return_before:.1f} |")
        lines.append(f"| after {episodes} of memory (same trial; nothing written) | {result.return_after:.1f} |")
        return lines
    update = UPDATES.get(result.algorithm, "update")
    lines.append(f"| before adaptation ({version_before}) | {result.return_before:.1f} |")
    lines.append(
        f"| after {episodes}, {update} ({result.candidate}, {'kept' if result.kept else 'rejected'}) "
        f"| {result.return_after:.1f} |"
    )
    return lines
