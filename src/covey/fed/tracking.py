"""Round metrics to the experiment trackers users already watch (`[run] report_to`).

- `tensorboard`: event files in `RUN/tensorboard/` (`tensorboard --logdir RUN/tensorboard`).
- `wandb`: a Weights & Biases run named after the run folder, in project `covey` unless
  `WANDB_PROJECT` says otherwise (`WANDB_MODE=offline` keeps it local).
- `mlflow`: an MLflow run named after the run folder, at `MLFLOW_TRACKING_URI` (default
  `./mlruns`), with every setting as a parameter.

Each round's saved record gives the same scalars to every tracker, at step = round; the run
folder stays the record of truth (metrics.jsonl), and a tracker only mirrors it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from covey.config import RunConfig, flatten, to_toml
from covey.errors import ConfigError

INSTALL = {
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
}
"""Each tracker's package (also its module name) and how to install it."""
TENSORBOARD_DIR = "tensorboard"


def check_available(report_to: Sequence[str]) -> None:
    """Refuse, before anything loads, a tracker whose package is not installed."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"run.report_to = {report_to!r}: {name} is not installed; install it with "
                f"`{INSTALL[name]}`, or leave {name!r} out of run.report_to"
            )


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a saved round record that trackers plot, under stable names."""
    scalars: dict[str, float] = {}
    evaluated, train = record.get("eval") or {}, record.get("train") or {}
    for key in ("loss", "perplexity", "rouge_l", "heavy_repetition"):
        if isinstance(evaluated.get(key), (int, float)):
            scalars[f"eval/{key}"] = float(evaluated[key])
    for key in ("loss", "tokens_per_s"):
        if isinstance(train.get(key), (int, float)):
            scalars[f"train/{key}"] = float(train[key])
    scalars["round/clients"] = float(len(record.get("clients") or []))
    scalars["round/rejected"] = float(len(record.get("rejected") or []))
    seconds = (record.get("seconds") or {}).get("round")
    if isinstance(seconds, (int, float)):
        scalars["round/seconds"] = float(seconds)
    return scalars


class _Tracker(Protocol):
    def __init__(self, cfg: RunConfig, out: Path) -> None: ...
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class Trackers:
    """The trackers named by `run.report_to`, opened for one run folder."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        check_available(cfg.run.report_to)
        opened: dict[str, type[_Tracker]] = {
            "tensorboard": _TensorBoard,
            "wandb": _WandB,
            "mlflow": _MLflow,
        }
        self._trackers = [opened[name](cfg, out) for name in cfg.run.report_to]

    def log_round(self, record: dict[str, Any]) -> None:
        scalars = round_scalars(record)
        for tracker in self._trackers:
            tracker.log(scalars, int(record["round"]))

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


class _TensorBoard:
    def __init__(self, cfg: RunConfig, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        self.writer.add_text("config.toml", f"```\n{to_toml(cfg)}\n```")

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every finished round

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: RunConfig, out: Path) -> None:
        import os

        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "covey"),
            name=out.resolve().name,
            dir=str(out),
            config=cfg.to_dict(),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, cfg: RunConfig, out: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=out.resolve().name)
        mlflow.log_params({k: str(v) for k, v in flatten(cfg.to_dict()).items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
