"""Batch-friendly logs and experiment tracking of ``medtl run``: log.jsonl, JSON lines on
stderr, TensorBoard event files by default, MLflow on request."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest

from medtl.cli import main
from medtl.demo import DEMO_RECIPE, make_phantom
from medtl.errors import ConfigError
from medtl.recipe import load_recipe
from medtl.tracking import JsonFormatter, TrackingConfig
from tests.conftest import sets

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "pretrain.backbone=medtl_tiny_convnext",
    "finetune.backbone=medtl_tiny_convnext",
    "pretrain.epochs=2",
    "finetune.epochs=2",
    "finetune.min_epochs=1",
    "pretrain.batch_size=16",
    "finetune.batch_size=16",
    "evaluate.n_boot=100",
    "data.loader.image_size=32",
]


def run(tmp_path: Path, *extra: str, overrides: tuple[str, ...] = ()) -> Path:
    data = make_phantom(tmp_path / "phantom", n=48, size=32)
    out = tmp_path / "run"
    argv = [*extra, "run", str(DEMO_RECIPE), "--data-root", str(data), "--out", str(out)]
    assert main([*argv, "--device", "cpu", *sets([*TINY, *overrides])]) == 0
    return out


def scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_json_formatter_writes_strict_json_with_extra_fields() -> None:
    record = logging.LogRecord("medtl.x", logging.INFO, __file__, 1, "epoch %d", (3,), None)
    record.metrics = {"train_loss": 0.5, "val_loss": math.nan}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "epoch 3" and line["level"] == "info"
    assert line["logger"] == "medtl.x" and line["time"].endswith("Z")
    assert line["metrics"] == {"train_loss": 0.5, "val_loss": None}


@pytest.mark.slow
def test_run_writes_json_log_tensorboard_and_a_json_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(tmp_path, "--log-format", "json")
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["stages"]["report"] == str(out / "report" / "report.html")
    # stderr: JSON lines only (no progress bars between them)
    lines = [json.loads(line) for line in captured.err.strip().splitlines()]
    assert any(line.get("event") == "epoch" for line in lines)

    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    done = {e["stage"] for e in events if e.get("event") == "stage_done"}
    assert done == {"pretrain", "finetune", "calibrate", "evaluate", "report"}
    for stage in done:  # each stage records when it finished
        marker = json.loads((out / stage / "DONE").read_text())
        assert marker["finished"] and marker["seconds"] >= 0
    epochs = [e for e in events if e.get("event") == "epoch"]
    assert len(epochs) == 4  # 2 pretraining + 2 fine-tuning epochs
    assert all("train_loss" in e["metrics"] and e["eta_s"] >= 0 for e in epochs)
    assert epochs[-1]["eta_s"] == 0 and "val_bacc" in epochs[-1]["metrics"]

    pre = scalars(out / "tensorboard" / "pretrain")
    assert len(pre["train_loss"]) == 2 and "final_loss" in pre
    fine = scalars(out / "tensorboard" / "finetune")
    assert len(fine["val_bacc"]) == 2 and len(fine["lr"]) == 2
    evaluation = scalars(out / "tensorboard" / "evaluate")
    auroc = evaluation["demo/test/macro_auroc/value"][0]
    low, high = (evaluation[f"demo/test/macro_auroc/{p}"][0] for p in ("ci_low", "ci_high"))
    assert low <= auroc <= high


@pytest.mark.slow
def test_tensorboard_off_and_mlflow_on(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    uri = (tmp_path / "mlruns").as_uri()
    overrides = ("tracking.tensorboard=false", "tracking.mlflow=true", f"tracking.mlflow_uri={uri}")
    out = run(tmp_path, "-q", overrides=overrides)
    assert not (out / "tensorboard").exists()
    state = json.loads((out / "tracking.json").read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    logged = client.get_run(state["mlflow_run_id"])
    assert logged.data.params["finetune.backbone"] == '"medtl_tiny_convnext"'
    history = client.get_metric_history(logged.info.run_id, "finetune/val_bacc")
    assert [m.step for m in history] == [1, 2]
    assert "evaluate/demo/test/macro_auroc/value" in logged.data.metrics
    artifacts = [a.path for a in client.list_artifacts(logged.info.run_id)]
    assert "report.html" in artifacts


def test_mlflow_requested_but_missing_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"tracking: mlflow is requested but not installed"):
        load_recipe(DEMO_RECIPE, ["tracking.mlflow=true"])
    assert TrackingConfig().tensorboard and not TrackingConfig().mlflow
    with pytest.raises(ConfigError, match=r"tracking.mlfow: unknown key; did you mean 'mlflow'"):
        load_recipe(DEMO_RECIPE, ["tracking.mlfow=true"])
