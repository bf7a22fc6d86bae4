"""report_to: every tracker receives the numbers of metrics.jsonl, stored locally and read back; a
tracker that is not installed is a clear error naming the extra to install."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftkit.config import ConfigError
from sftkit.train import sinks
from tests.train_helpers import tiny_config, write_chat_data


def test_missing_tracker_is_a_clear_error_naming_the_extra(monkeypatch):
    real = sinks.importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name: None if name == "trackio" else real(name))
    with pytest.raises(
        ConfigError,
        match=r"report_to includes 'trackio' but trackio is not installed; "
        r"pip install 'sftkit\[trackio\]'",
    ):
        sinks.check_installed(["tensorboard", "trackio"])
    sinks.check_installed(["tensorboard", "mlflow"])


def wandb_offline_history(output_dir: Path) -> dict[tuple[int, str], float]:
    """(step, key) → value from an offline W&B run's transaction log (.wandb: a LevelDB-style log of
    protobuf records in 32 KiB blocks after a 7-byte header), read without any server."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(output_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pending, values = 32768, 7, b"", {}
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if length == 0 and kind == 0:
            break
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        values[step, key] = json.loads(item.value_json)
    return values


@pytest.mark.slow
def test_every_sink_receives_the_metrics_of_a_run(tmp_path, tiny_model_dir, monkeypatch):
    """A real run with report_to [tensorboard, wandb, mlflow, trackio], offline: each local store
    holds the loss, token accuracy, clipped share, eval loss and the per-source figures (flattened:
    source_loss/chat) of every logged row of metrics.jsonl."""
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_chat_data(tmp_path / "chat.jsonl", rows=16)
    out = tmp_path / "out"
    config = tiny_config(
        tiny_model_dir,
        data,
        out,
        max_steps=3,
        eval_split_ratio=0.25,
        eval_steps=3,
        max_new_tokens=2,
        report_to=["tensorboard", "wandb", "mlflow", "trackio"],
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))},
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "sftkit.cli", "train", str(tmp_path / "run.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wanted = (
        "loss",
        "token_accuracy",
        "clipped_fraction",
        "eval_loss",
        "eval_token_accuracy",
        "source_loss/chat",
        "source_trained_tokens/chat",
    )  # per-source figures: one curve per source
    expected = {
        (row["step"], key): value for row in rows for key, value in sinks.flat_scalars(row).items() if key in wanted
    }
    assert {key for _, key in expected} == set(wanted)

    def assert_holds(store: str, got: dict[tuple[int, str], float]) -> None:
        for (step, key), value in expected.items():
            assert got.get((step, key)) == pytest.approx(value, rel=1e-6), (store, step, key)

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert_holds(
        "tensorboard",
        {
            (event.step, tag.split("/", 1)[1]): event.value
            for tag in events.Tags()["scalars"]
            for event in events.Scalars(tag)
        },
    )

    assert_holds("wandb", wandb_offline_history(out))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("sftkit").experiment_id])
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == str(config.learning_rate)
    assert_holds(
        "mlflow",
        {
            (metric.step, key): metric.value
            for key in {key for _, key in expected}
            for metric in client.get_metric_history(run.info.run_id, key)
        },
    )

    read = (
        "import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
        "print(json.dumps(SQLiteStorage.get_logs('sftkit', 'out')))"
    )
    logs = json.loads(
        subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True, timeout=120)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert_holds("trackio", {(log["step"], key): value for log in logs for key, value in log.items()})
