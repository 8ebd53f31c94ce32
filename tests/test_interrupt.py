"""A run killed outright (SIGKILL, as a crash or a pre-empted batch job ends it) during
pretraining and again during the BioTune search finishes when the same command is run again,
with the same report as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medtl.demo import DEMO_RECIPE, make_phantom
from medtl.finetune.search import read_trials

OVERRIDES = [
    "pretrain.backbone=medtl_tiny_convnext",
    "finetune.backbone=medtl_tiny_convnext",
    "pretrain.epochs=8",  # long enough for a kill to land inside it
    "pretrain.batch_size=8",
    "finetune.batch_size=16",
    "finetune.strategy=biotune",
    "finetune.epochs=2",
    "finetune.min_epochs=1",
    "data.loader.image_size=32",
    "evaluate.n_boot=100",
    "search.preset=cpu",
    "search.population=3",
    "search.elite=1",
    "search.exploit=0",
    "search.generations=2",
    "search.seeds=1",
    "search.max_epochs=2",
    "search.min_epochs=1",
]
VOLATILE = {"seconds", "created", "Training wall time", "trial_seconds", "heartbeat"}


def command(data: Path, out: Path) -> list[str]:
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    return [
        sys.executable, "-m", "medtl.cli", "-q", "run", str(DEMO_RECIPE), "--data-root",
        str(data), "--out", str(out), "--device", "cpu", *sets,
    ]  # fmt: skip


def run(cmd: list[str], kill_when: Callable[[], bool] | None = None) -> bool:
    """Run ``cmd``; SIGKILL it as soon as ``kill_when()`` holds. True if it was killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return False


def pretraining(out: Path) -> Callable[[], bool]:
    def check() -> bool:
        folder = out / "pretrain"
        return (folder / "checkpoint.pt").is_file() and not (folder / "DONE").is_file()

    return check


def searching(out: Path) -> Callable[[], bool]:
    def check() -> bool:
        db = out / "finetune" / "trials.db"
        if not db.is_file() or (out / "finetune" / "DONE").is_file():
            return False
        try:
            done = [t for t in read_trials(db) if t.status == "done"]
        except Exception:  # created but not yet a study, or busy: look again
            return False
        return len(done) >= 2

    return check


def normalised(report: Path, out: Path) -> Any:
    """report.json without wall times and dates, with the run folder's path made relative."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if k not in VOLATILE}
        if isinstance(node, list):
            return [clean(v) for v in node]
        if isinstance(node, str):
            return node.replace(str(out), "<run>")
        return node

    return clean(json.loads(report.read_text()))


@pytest.mark.slow
def test_killed_during_pretraining_and_search_ends_with_the_same_report(tmp_path: Path) -> None:
    data = make_phantom(tmp_path / "phantom", n=48, size=32)
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    assert not run(command(data, plain))

    cmd = command(data, killed)
    assert run(cmd, pretraining(killed)), "the run ended before it could be killed in pretraining"
    assert not (killed / "pretrain" / "DONE").exists()
    assert not (killed / "report").exists()
    assert run(cmd, searching(killed)), "the run ended before it could be killed in the search"
    assert (killed / "pretrain" / "DONE").is_file()  # not redone by the second session
    assert not (killed / "finetune" / "DONE").exists()
    assert not run(cmd)

    events = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    starts = [(e["stage"], e["resumed"]) for e in events if e.get("event") == "stage_start"]
    assert starts.count(("pretrain", True)) == 1  # resumed once, never restarted from scratch
    assert ("finetune", True) in starts and ("pretrain", False) in starts
    trials_logged = [e["trial"] for e in events if e.get("event") == "trial"]
    assert trials_logged and all("genome" in t and "fitness" in t for t in trials_logged)
    assert all(e["eta_s"] >= 0 for e in events if e.get("event") == "trial")
    trials = read_trials(killed / "finetune" / "trials.db")
    assert len(trials) == len(read_trials(plain / "finetune" / "trials.db"))

    got = normalised(killed / "report" / "report.json", killed)
    want = normalised(plain / "report" / "report.json", plain)
    assert got == want
