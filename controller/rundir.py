"""Run directory: resolved config, atomic checkpoints, CSV + TensorBoard metrics, learning-curve plot."""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from controller.errors import CheckpointError

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; bundles and runs are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_torch(path: Path) -> Any:
    """Load a torch file without executing code (weights_only), as a CheckpointError on any damage."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is corrupt or not a metactl file: {error}") from error


class RunDir:
    """Everything a training run writes, in one directory.

    Layout: config.yaml, checkpoints/latest.pt, metrics.csv, tensorboard/, learning_curve.png.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._writer = None
        self._columns: list[str] | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "latest.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_bytes(self.config_path, yaml.safe_dump(config, sort_keys=False).encode())

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text())

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists()

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_torch(state, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists():
            raise CheckpointError(f"no checkpoint in {self.path}")
        return load_torch(self.checkpoint_path)

    def truncate_metrics(self, num_rows: int) -> None:
        """Drop metric rows past `num_rows` (written after the checkpoint a resumed run starts from)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        atomic_write_bytes(self.metrics_path, "".join(lines[: num_rows + 1]).encode())

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append one CSV row and the same scalars to TensorBoard."""
        row = {"step": step, **metrics}
        new_file = not self.metrics_path.exists()
        if self._columns is None:
            self._columns = list(row) if new_file else self.metrics_path.read_text().splitlines()[0].split(",")
        if not new_file and any(key not in self._columns for key in row):
            # A metric appeared (e.g. sub-policy losses after warm-up): rewrite with the wider header.
            old_rows = self.read_metrics()
            self._columns += [key for key in row if key not in self._columns]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(old_rows)
            atomic_write_bytes(self.metrics_path, buffer.getvalue().encode())
        with self.metrics_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tensorboard"))
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def read_metrics(self) -> list[dict[str, float]]:
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open() as handle:
            return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]

    def plot_learning_curve(self, key: str = "episode_return") -> Path | None:
        """PNG of `key` against environment steps."""
        rows = [row for row in self.read_metrics() if key in row]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([row["step"] for row in rows], [row[key] for row in rows])
        axis.set_xlabel("environment steps")
        axis.set_ylabel(key.replace("_", " "))
        axis.grid(alpha=0.3)
        figure.tight_layout()
        out = self.path / "learning_curve.png"
        figure.savefig(out, dpi=100)
        plt.close(figure)
        return out

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """numpy Generator state as plain values (torch.load(weights_only=True) accepts them)."""
    state = rng.bit_generator.state
    return {
        "bit_generator": state["bit_generator"],
        "state": int(state["state"]["state"]),
        "inc": int(state["state"]["inc"]),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def rng_from_state(data: dict[str, Any]) -> np.random.Generator:
    """The Generator that `rng_state` described."""
    rng = np.random.default_rng()
    rng.bit_generator.state = {
        "bit_generator": data["bit_generator"],
        "state": {"state": data["state"], "inc": data["inc"]},
        "has_uint32": data["has_uint32"],
        "uinteger": data["uinteger"],
    }
    return rng
