"""Where metric rows go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow, trackio.

Each sink is a small adapter with the same three calls (log scalars at a step, log a text, close),
so the loop never knows which ones are on. All of them store locally unless their own environment
variables send them elsewhere, with the names transformers' integrations read:

    tensorboard   OUTPUT_DIR/tensorboard/
    wandb         OUTPUT_DIR/wandb/ (WANDB_PROJECT, WANDB_MODE=offline for no network)
    mlflow        OUTPUT_DIR/mlruns/, or MLFLOW_TRACKING_URI; experiment MLFLOW_EXPERIMENT_NAME (default sftkit)
    trackio       trackio's local store (TRACKIO_DIR); project TRACKIO_PROJECT (default sftkit)

The trackers besides TensorBoard are optional installs: `check_installed` names the extra to
install before any data or model is loaded. Sinks take flat numbers: a row's figures per training
source become one curve each (`source_loss/gsm8k`, under `train/` in TensorBoard; see `flat_scalars`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sftkit.config import ConfigError

# sink → (module to import, the pip extra that installs it)
OPTIONAL = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


class Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def close(self) -> None: ...


def check_installed(sinks: list[str]) -> None:
    """Fail fast, naming the extra, when `report_to` asks for a tracker that is not installed."""
    for sink in sinks:
        if sink in OPTIONAL and importlib.util.find_spec(OPTIONAL[sink][0]) is None:
            module, extra = OPTIONAL[sink]
            raise ConfigError(
                f"report_to includes '{sink}' but {module} is not installed; "
                f"pip install 'sftkit[{extra}]', or remove '{sink}' from report_to"
            )


def flat_scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row as flat keys: {"source_loss": {"gsm8k": 1.2}} → {"source_loss/gsm8k": 1.2}.

    Values that are not numbers (text, null) are left out.
    """
    flat: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = value
    return flat


def open_sinks(sinks: list[str], output_dir: Path, run_name: str, config: dict[str, Any]) -> list[Sink]:
    check_installed(sinks)
    builders: dict[str, Callable[..., Sink]] = {
        "tensorboard": TensorBoardSink,
        "wandb": wandb_sink,
        "mlflow": MlflowSink,
        "trackio": trackio_sink,
    }
    return [builders[sink](output_dir, run_name, config) for sink in sinks]


class TensorBoardSink:
    """Scalars under train/ and eval/ (eval_* keys), so the two groups get their own sections."""

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class RunObjectSink:
    """W&B and trackio: both hand back a run object with `log(scalars, step=)` and `finish()`."""

    def __init__(self, run: Any):
        self.run = run

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        pass  # samples are in samples.jsonl and the report

    def close(self) -> None:
        self.run.finish()


def wandb_sink(output_dir: Path, run_name: str, config: dict[str, Any]) -> RunObjectSink:
    import wandb

    return RunObjectSink(wandb.init(name=run_name, config=config, dir=str(output_dir)))


def trackio_sink(output_dir: Path, run_name: str, config: dict[str, Any]) -> RunObjectSink:
    import trackio

    return RunObjectSink(
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "sftkit"), name=run_name, config=config)
    )


class MlflowSink:
    """One MLflow run per training run, through the client API (no global active run to leak).

    With no MLFLOW_TRACKING_URI the store is a folder in the run directory (`mlflow ui
    --backend-store-uri OUTPUT_DIR/mlruns` shows it); MLflow 3 keeps that file store behind
    MLFLOW_ALLOW_FILE_STORE, which is set for this process unless the user set it.
    """

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sftkit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        # MLflow params are flat strings of bounded length: top-level keys, values cut at 500 characters.
        self.client.log_batch(self.run_id, params=[Param(key, str(value)[:500]) for key, value in config.items()])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in scalars.items()]
        )

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step}.md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
