"""How the report and the benchmarks write numbers: ``mean_sd`` over seeds, ``fmt_entry``."""

from __future__ import annotations

import math

from medtl.report.tables import fmt_entry, mean_sd


def test_mean_sd_of_seeds_worked_by_hand() -> None:
    # mean 0.8, sample SD sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1
    assert mean_sd([0.7, 0.8, 0.9]) == "0.800 ± 0.100"
    assert mean_sd([10.0, 14.0], digits=1) == "12.0 ± 2.8"  # SD sqrt(8) = 2.83
    assert mean_sd([3.0, 5.0], digits=0) == "4 ± 1"


def test_mean_sd_leaves_out_undefined_values_and_says_when_none_is_left() -> None:
    assert mean_sd([0.7, math.nan, None, 0.9]) == mean_sd([0.7, 0.9]) == "0.800 ± 0.141"
    assert mean_sd([0.8125]) == "0.812"  # one seed: no spread
    assert mean_sd([math.nan, None]) == "n/a"
    assert mean_sd([], missing="–") == "–"


def test_fmt_entry_writes_a_value_with_its_interval() -> None:
    entry = {"value": 0.8766, "ci_low": 0.8, "ci_high": 0.95}
    assert fmt_entry(entry) == "0.877 [0.800, 0.950]"
    assert fmt_entry({"value": None, "ci_low": 0.1, "ci_high": 0.2}) == "n/a"
    assert fmt_entry(None) == "n/a"
