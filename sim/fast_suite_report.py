"""The point-task suite's report (sim/fast_suite.py): summary statistics, Markdown tables and the plot.

Works on the suite's results dict alone: `methods[name][str(k)]` per-task returns, `tasks[i]["split"]`,
`reference` (the method names of the random and oracle ends of the normalized score),
`uses_adaptation[name]` and `train_seconds[name]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

Summary = dict[str, dict[str, dict[str, float | None]]]
"""method -> str(K) -> {"mean", "std", "normalized", "normalized <split>" ...}."""


def normalized_score(returns: np.ndarray, random: np.ndarray, oracle: np.ndarray) -> float | None:
    """(mean R - mean R_random) / (mean R_oracle - mean R_random) over tasks; None if the oracle does not beat random.

    A ratio of means rather than a mean of per-task ratios, so a task where the oracle barely beats
    random cannot dominate the score.
    """
    if not len(returns):
        return None
    gap = oracle.mean() - random.mean()
    return float((returns.mean() - random.mean()) / gap) if gap > 1e-9 else None


def splits_of(results: dict[str, Any]) -> list[str]:
    """The held-out splits in order of first appearance."""
    return list(dict.fromkeys(task["split"] for task in results["tasks"]))


def summarize(results: dict[str, Any]) -> Summary:
    """Per method and K: mean and std (across tasks) of the return, normalized score overall and per split."""
    methods, reference = results["methods"], results["reference"]
    splits = np.array([task["split"] for task in results["tasks"]])
    summary: Summary = {}
    for name, per_k in methods.items():
        summary[name] = {}
        for k, values in per_k.items():
            values = np.array(values)
            random, oracle = np.array(methods[reference["random"]][k]), np.array(methods[reference["oracle"]][k])
            row: dict[str, float | None] = {"mean": float(values.mean()), "std": float(values.std())}
            row["normalized"] = normalized_score(values, random, oracle)
            for split in splits_of(results):
                chosen = splits == split
                row[f"normalized {split}"] = normalized_score(values[chosen], random[chosen], oracle[chosen])
            summary[name][k] = row
    return summary


def _format_score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Two tables: return mean ± std (normalized score) per K; the normalized score per held-out split."""
    ks, summary, splits = [str(k) for k in results["ks"]], results["summary"], splits_of(results)
    header = "| method | train (s) | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(ks)]
    for name, per_k in summary.items():
        seconds = results["train_seconds"].get(name)
        trained = "" if seconds is None else f"{seconds:.0f}"
        label = name if results["uses_adaptation"][name] else f"{name} (K has no effect)"
        cells = [f"{row['mean']:.1f} ± {row['std']:.1f} ({_format_score(row['normalized'])})" for row in per_k.values()]
        lines.append(f"| {label} | {trained} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: return mean ± std across tasks (normalized score). Train (s): wall-clock training time; a"]
    lines += ["blank one trains nothing of its own (the fine-tuning rows adapt the domain-randomized policy)."]
    lines += ["", "Normalized score per held-out split (" + " / ".join(splits) + "):", ""]
    lines += [header.replace(" train (s) |", ""), "|---|" + "---:|" * len(ks)]
    for name, per_k in summary.items():
        cells = [" / ".join(_format_score(per_k[k][f"normalized {split}"]) for split in splits) for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str | Path) -> None:
    """Mean evaluation return (error bars: std across tasks) against K, one line per method (dashed: K-free)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    ks = [int(k) for k in results["ks"]]
    colors, markers = plt.get_cmap("tab10"), "osD^v<>ph*X"
    for index, (name, per_k) in enumerate(results["summary"].items()):
        means = [per_k[str(k)]["mean"] for k in ks]
        stds = [per_k[str(k)]["std"] for k in ks]
        offset = (index - len(results["summary"]) / 2) * 0.03  # keep overlapping error bars apart
        style = "-" if results["uses_adaptation"][name] else "--"
        axis.errorbar(
            [k + offset for k in ks], means, yerr=stds, marker=markers[index % len(markers)], markersize=4,
            linestyle=style, linewidth=1.2, elinewidth=0.6, capsize=2, label=name, color=colors(index % 10),
        )  # fmt: skip
    axis.set_xlabel("adaptation episodes K")
    axis.set_ylabel("evaluation return")
    axis.set_title("point task: held-out goals and damping")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
