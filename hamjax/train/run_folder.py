"""A run folder: config.json, metrics.jsonl (one JSON record per line), checkpoints/, plot.png, summary.json."""

from __future__ import annotations

import json
import pathlib

from hamjax.train.config import RunConfig, config_from_dict, config_to_dict, resume_conflicts


def prepare_run_folder(config: RunConfig, *, write: bool = True) -> pathlib.Path:
    """Create the folder and write config.json (unless not `write`: the other processes of a
    multi-process run); where the folder already holds a checkpoint, first check that its run used
    the same config (ValueError naming the fields that differ)."""
    run = pathlib.Path(config.run_dir)
    path = run / "config.json"
    checkpoints = run / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if path.exists() and has_checkpoint:
        conflicts = resume_conflicts(config_from_dict(json.loads(path.read_text())), config)
        if conflicts:
            raise ValueError(
                f"{run} holds a run with another config ({'; '.join(conflicts)}); "
                "pass another --run_dir or use the saved settings to resume"
            )
    if write:
        run.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    return run


def load_run_config(run_dir: str | pathlib.Path) -> RunConfig:
    path = pathlib.Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no run found at {run_dir} (missing {path})")
    return config_from_dict(json.loads(path.read_text()))


class MetricsLog:
    """metrics.jsonl, append-only; on resume from `resume_step`, records of later steps (written
    after that checkpoint by the interrupted run) are dropped first, so the log matches the state.
    With write=False (the other processes of a multi-process run) it touches nothing."""

    def __init__(self, path: str | pathlib.Path, resume_step: int = 0, *, write: bool = True):
        self.path, self.enabled = pathlib.Path(path), write
        if write:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
