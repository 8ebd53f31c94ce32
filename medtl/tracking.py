"""What a run tells the outside world while it works: logs and experiment tracking.

- ``<run>/log.jsonl``: every log record of the run as one JSON object per line (always), for
  batch schedulers and scripts; ``medtl --log-format json`` prints the same lines on stderr.
- TensorBoard (``tracking.tensorboard``, on by default): one event folder per stage under
  ``<run>/tensorboard/`` (``pretrain``, ``finetune``, ``search/<trial>``), every epoch's record
  (losses, learning rate, validation metrics, seconds) as scalars, and the test figures at the end.
- MLflow (``tracking.mlflow: true``, when ``mlflow`` is installed): the resolved recipe as
  parameters, the same per-epoch metrics prefixed by stage, the test figures and the report as an
  artifact. The MLflow run id is kept in ``<run>/tracking.json``, so a resumed run logs into the
  same MLflow run.

Training code reports through :func:`log_epoch` and :func:`log_summary`, which do nothing unless
a stage runs inside :meth:`Tracker.scope`; so ``fit`` and the search need no tracker argument.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtl.io import finite, write_json

LOG_FILE = "log.jsonl"
STATE_FILE = "tracking.json"


class TrackingConfig(BaseModel):
    """Experiment tracking: TensorBoard event files in the run folder, MLflow on request."""

    model_config = ConfigDict(extra="forbid")

    tensorboard: bool = Field(True, description="TensorBoard event files in <run>/tensorboard/")
    mlflow: bool = Field(False, description="log to MLflow too (needs `pip install mlflow`)")
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else <run>/mlruns)",
    )
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment name (default: the recipe's name)"
    )

    @model_validator(mode="after")
    def _installed(self) -> TrackingConfig:
        if self.mlflow and importlib.util.find_spec("mlflow") is None:
            raise ValueError(
                "mlflow is requested but not installed; `pip install mlflow-skinny` "
                "or set tracking.mlflow: false"
            )
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "tensorboard is not installed; `pip install tensorboard` "
                "or set tracking.tensorboard: false"
            )
        return self


# -- JSON log lines --------------------------------------------------------------------------
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message and any
    ``extra=`` fields (non-finite floats as null, so every line is strict JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = finite(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, allow_nan=False, default=str)


_run_handler: logging.Handler | None = None


def log_to_run_folder(out: Path) -> Path:
    """Append the ``medtl`` logger's records to ``<out>/log.jsonl`` (one run folder per process
    at a time: opening another run moves the file handler there)."""
    global _run_handler
    logger = logging.getLogger("medtl")
    if _run_handler is not None:
        logger.removeHandler(_run_handler)
        _run_handler.close()
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the file gets info even when the terminal shows less
    _run_handler = handler
    return out / LOG_FILE


# -- trackers --------------------------------------------------------------------------------
class Tracker:
    """TensorBoard and/or MLflow for one run folder; stages report inside :meth:`scope`."""

    def __init__(self, out: Path, cfg: TrackingConfig, name: str, params: dict[str, Any]) -> None:
        self.out, self.cfg, self.name, self.params = out, cfg, name, params
        self._writers: dict[str, Any] = {}
        self._mlflow: Any = None

    # scopes
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[Tracker]:
        """Report under ``name`` (nested scopes join with ``/``) while the block runs."""
        parent = _scope.get()
        full = f"{parent[1]}/{name}" if parent and parent[0] is self else name
        token = _scope.set((self, full))
        try:
            yield self
        finally:
            _scope.reset(token)
            writer = self._writers.pop(full, None)
            if writer is not None:
                writer.close()

    def epoch(self, scope: str, record: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in record.items() if _number(v) and k != "epoch"}
        if self.cfg.tensorboard:
            writer = self._writer(scope)
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
        if self.cfg.mlflow:
            self._mlflow_client().log_metrics(
                {_metric_name(f"{scope}/{k}"): v for k, v in scalars.items()}, step=step
            )

    def summary(self, scope: str, metrics: dict[str, float], text: str | None = None) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if _number(v)}
        if self.cfg.tensorboard:
            writer = self._writer(scope)
            for key, value in metrics.items():
                writer.add_scalar(key, value, 0)
            if text:
                writer.add_text("summary", text, 0)
            writer.flush()
        if self.cfg.mlflow:
            self._mlflow_client().log_metrics(
                {_metric_name(f"{scope}/{k}"): v for k, v in metrics.items()}
            )

    def artifact(self, path: Path) -> None:
        if self.cfg.mlflow and path.is_file():
            self._mlflow_client().log_artifact(str(path))

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None

    # backends
    def _writer(self, scope: str) -> Any:
        if scope not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[scope] = SummaryWriter(log_dir=str(self.out / "tensorboard" / scope))
        return self._writers[scope]

    def _mlflow_client(self) -> Any:
        if self._mlflow is None:
            import mlflow

            state_file = self.out / STATE_FILE
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            uri = self.cfg.mlflow_uri or state.get("mlflow_uri")
            if uri is None:
                uri = (
                    os.environ.get("MLFLOW_TRACKING_URI")
                    or (self.out / "mlruns").resolve().as_uri()
                )
            if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(self.cfg.mlflow_experiment or self.name)
            run = mlflow.start_run(run_id=state.get("mlflow_run_id"), run_name=self.out.name)
            if "mlflow_run_id" not in state:
                mlflow.log_params(_flatten(self.params))
                write_json(state_file, {"mlflow_uri": uri, "mlflow_run_id": run.info.run_id})
            self._mlflow = mlflow
        return self._mlflow


_scope: contextvars.ContextVar[tuple[Tracker, str] | None] = contextvars.ContextVar(
    "medtl_tracking_scope", default=None
)


@contextlib.contextmanager
def child(name: str) -> Iterator[None]:
    """A nested scope of the active tracker (e.g. one search trial), or nothing."""
    active = _scope.get()
    if active is None:
        yield
        return
    with active[0].scope(name):
        yield


def log_epoch(record: dict[str, Any], step: int) -> None:
    """Report one epoch's record to the active tracker, if any (``fit`` calls this)."""
    active = _scope.get()
    if active is not None:
        active[0].epoch(active[1], record, step)


def log_summary(metrics: dict[str, float], text: str | None = None) -> None:
    """Report a stage's final figures to the active tracker, if any."""
    active = _scope.get()
    if active is not None:
        active[0].summary(active[1], metrics, text)


def log_artifact(path: Path) -> None:
    active = _scope.get()
    if active is not None:
        active[0].artifact(path)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow caps a value at 6000 characters)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, default=str)[:6000]
    return out
