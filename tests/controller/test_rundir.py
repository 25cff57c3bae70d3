"""Run directory (controller/rundir.py): atomic checkpoints, metrics CSV, learning-curve plot."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from controller.errors import CheckpointError
from controller.rundir import RunDir, atomic_write_bytes, load_torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    yield run_dir
    run_dir.close()


def checkpoint_state() -> dict:
    # The kinds of values a trainer stores: weights, optimizer numbers, counters, RNG state as ints.
    rng = np.random.default_rng(3)
    bit_state = rng.bit_generator.state
    return {
        "policy": {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "layer.bias": torch.zeros(2)},
        "group": 4,
        "total_steps": 8192,
        "wall_time_s": 1.25,
        "rng": {"state": int(bit_state["state"]["state"]), "inc": int(bit_state["state"]["inc"])},
        "torch_rng": torch.get_rng_state(),
        "name": "mlsh",
        "hidden": [64, 64],
    }


def leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# -- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip(run):
    assert not run.has_checkpoint()
    state = checkpoint_state()
    run.save_checkpoint(state)
    assert run.has_checkpoint()
    assert run.checkpoint_path == run.path / "checkpoints" / "latest.pt"
    loaded = run.load_checkpoint()
    assert set(loaded) == set(state)
    for key in ("layer.weight", "layer.bias"):
        assert torch.equal(loaded["policy"][key], state["policy"][key])
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    for key in ("group", "total_steps", "wall_time_s", "rng", "name", "hidden"):
        assert loaded[key] == state[key]
    # Written via a temporary file and renamed: nothing else is left, and it is readable by others.
    assert leftovers(run.checkpoint_path.parent, "latest.pt") == []
    assert stat.S_IMODE(run.checkpoint_path.stat().st_mode) == 0o644


def test_checkpoint_overwrite_keeps_only_the_latest(run):
    run.save_checkpoint({"group": 1})
    run.save_checkpoint({"group": 2})
    assert run.load_checkpoint() == {"group": 2}
    assert leftovers(run.checkpoint_path.parent, "latest.pt") == []


def test_failed_save_leaves_previous_checkpoint_intact(run):
    run.save_checkpoint({"group": 1})
    with pytest.raises(Exception):  # noqa: B017 - pickle raises AttributeError or PicklingError by version
        run.save_checkpoint({"group": 2, "not_picklable": lambda: None})
    assert run.load_checkpoint() == {"group": 1}
    # A write that fails half-way through removes its temporary file.
    with pytest.raises(TypeError):
        atomic_write_bytes(run.checkpoint_path, "text, not bytes")  # type: ignore[arg-type]
    assert run.load_checkpoint() == {"group": 1}
    assert leftovers(run.checkpoint_path.parent, "latest.pt") == []


def test_truncated_checkpoint_raises_checkpoint_error(run):
    run.save_checkpoint(checkpoint_state())
    data = run.checkpoint_path.read_bytes()
    run.checkpoint_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        run.load_checkpoint()
    run.checkpoint_path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        run.load_checkpoint()


def test_foreign_or_missing_checkpoint(run, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run.load_checkpoint()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_torch(garbage)
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "absent.pt")


def test_checkpoint_with_arbitrary_object_is_refused(run):
    # weights_only loading never runs pickled code: an arbitrary class is refused as CheckpointError.
    run.checkpoint_path.parent.mkdir(parents=True)
    torch.save({"object": Path("x")}, run.checkpoint_path)
    with pytest.raises(CheckpointError):
        run.load_checkpoint()


def test_config_round_trip(run):
    config = {"robot": "a1", "mlsh": {"num_task_groups": 3}, "policy": {"sub_hidden": [16, 16]}}
    run.write_config(config)
    assert run.read_config() == config
    assert list(run.read_config()) == ["robot", "mlsh", "policy"]  # order kept (sort_keys=False)


# -- metrics ----------------------------------------------------------------------------------------


def test_metrics_csv_rows(run):
    assert run.read_metrics() == []
    run.log_metrics(100, {"episode_return": 1.5, "loss": 0.25})
    run.log_metrics(200, {"episode_return": 2.5, "loss": 0.125})
    lines = run.metrics_path.read_text().splitlines()
    assert lines[0] == "step,episode_return,loss"
    assert run.read_metrics() == [
        {"step": 100.0, "episode_return": 1.5, "loss": 0.25},
        {"step": 200.0, "episode_return": 2.5, "loss": 0.125},
    ]
    assert any((run.path / "tensorboard").iterdir())


def test_metrics_csv_grows_a_column_for_a_new_metric(run):
    run.log_metrics(100, {"loss": 0.5})
    run.log_metrics(200, {"loss": 0.25, "sub_loss": 1.0})
    assert run.metrics_path.read_text().splitlines()[0] == "step,loss,sub_loss"
    assert run.read_metrics() == [
        {"step": 100.0, "loss": 0.5},
        {"step": 200.0, "loss": 0.25, "sub_loss": 1.0},
    ]
    # A row missing a metric leaves its cell empty.
    run.log_metrics(300, {"sub_loss": 2.0})
    assert run.read_metrics()[-1] == {"step": 300.0, "sub_loss": 2.0}


def test_metrics_resume_in_a_new_run_dir_object(run):
    run.log_metrics(100, {"loss": 0.5})
    run.close()
    again = RunDir(run.path)
    again.log_metrics(200, {"loss": 0.25})
    again.log_metrics(300, {"loss": 0.125, "kl": 0.01})
    again.close()
    assert [row["step"] for row in again.read_metrics()] == [100.0, 200.0, 300.0]
    assert again.read_metrics()[-1] == {"step": 300.0, "loss": 0.125, "kl": 0.01}


def test_truncate_metrics(run):
    run.truncate_metrics(0)  # no file yet: nothing to do
    assert not run.metrics_path.exists()
    for step in range(1, 6):
        run.log_metrics(step * 10, {"loss": 1.0 / step})
    run.truncate_metrics(2)
    assert [row["step"] for row in run.read_metrics()] == [10.0, 20.0]
    run.log_metrics(30, {"loss": 9.0})  # a resumed run appends after the kept rows
    assert [row["step"] for row in run.read_metrics()] == [10.0, 20.0, 30.0]
    run.truncate_metrics(0)
    assert run.read_metrics() == []
    assert run.metrics_path.read_text().splitlines() == ["step,loss"]  # the header stays
    run.truncate_metrics(10)  # more rows than exist: unchanged
    assert run.metrics_path.read_text().splitlines() == ["step,loss"]


# -- plot -------------------------------------------------------------------------------------------


def test_plot_learning_curve_writes_png(run):
    assert run.plot_learning_curve() is None  # no metrics yet
    run.log_metrics(100, {"loss": 0.5})
    assert run.plot_learning_curve() is None  # no episode_return column
    for step, value in ((200, 1.0), (300, 3.0), (400, 2.0)):
        run.log_metrics(step, {"episode_return": value})
    out = run.plot_learning_curve()
    assert out == run.path / "learning_curve.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 1000
    other = run.plot_learning_curve("loss")
    assert other is not None and other.read_bytes()[:8] == PNG_MAGIC
