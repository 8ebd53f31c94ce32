"""The report's conformal block: rendered from the evaluation record, empty without one."""

from __future__ import annotations

import numpy as np

from medtl.calibrate import NoCalibration
from medtl.conformal import ConformalConfig, conformal_summary, fit_conformal
from medtl.predictions import Predictions
from medtl.report.conformal import conformal_block
from medtl.report.load import EntryView


def _pred(n: int, split: str, seed: int) -> Predictions:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1, 1], size=n)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    ids = [f"{split}{i}" for i in range(n)]
    return Predictions(ids, ids, labels, np.log(probs), ["a", "b", "c"], split)


def test_block_shows_coverage_per_class_against_the_target() -> None:
    card = fit_conformal(_pred(300, "val", 0), NoCalibration(), ConformalConfig(mondrian=True))
    record = conformal_summary(_pred(200, "test", 1), NoCalibration(), card)
    html = conformal_block(EntryView(0, {"split": "test", "conformal": record}))
    assert "Conformal prediction sets (test split)" in html
    assert "class-conditional (Mondrian)" in html and "target coverage of 90%" in html
    for name in ("All", "a", "b", "c"):
        assert f"<td>{name}</td>" in html
    assert "data:image/png;base64," in html  # the risk-coverage curve
    assert f"{record['coverage']['value']:.3f}" in html


def test_no_block_without_conformal_sets() -> None:
    assert conformal_block(EntryView(0, {"split": "test"})) == ""
