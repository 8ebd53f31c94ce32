from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from medtl.data.split import (
    DEFAULT_RATIOS,
    carve_validation,
    check_ratios,
    group_position,
    group_split,
)
from medtl.errors import ConfigError, DataError


def _data(n_groups: int = 60) -> tuple[list[str], list[str]]:
    labels, groups = [], []
    for g in range(n_groups):
        size = 1 + g % 3  # groups of 1, 2 and 3 samples
        label = "a" if g % 4 else "b"  # 3:1 class imbalance
        labels += [label] * size
        groups += [f"g{g}"] * size
    return labels, groups


def test_groups_never_straddle_splits() -> None:
    labels, groups = _data()
    splits = group_split(labels, groups, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    seen: dict[str, set[str]] = {}
    for g, s in zip(groups, splits, strict=True):
        seen.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in seen.values())


def test_ratios_and_class_balance_are_close_to_target_on_realistic_sizes() -> None:
    """Placement is canonical per group, so shares hold in expectation: on 2000 groups (about
    4000 samples, BUSI-to-ISIC scale) within 3 points overall and 5 points per class."""
    labels, groups = _data(2000)
    for seed in (0, 1, 2):
        splits = group_split(labels, groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
        n = len(labels)
        share = {s: c / n for s, c in Counter(splits).items()}
        assert share == pytest.approx({"train": 0.6, "val": 0.2, "test": 0.2}, abs=0.03)
        for split in ("train", "val", "test"):
            sub = [lab for lab, s in zip(labels, splits, strict=True) if s == split]
            assert sub.count("b") / len(sub) == pytest.approx(labels.count("b") / n, abs=0.05)


def test_a_subset_and_its_superset_agree_on_every_shared_group() -> None:
    """A development sample and the full release: each group keeps its split, whatever else
    the dataset holds and in whatever order."""
    labels, groups = _data(3000)
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    full = dict(zip(groups, group_split(labels, groups, ratios, seed=0), strict=True))
    keep = [i for i, g in enumerate(groups) if int(g[1:]) % 7 in (0, 3)]  # about 30%
    keep.reverse()  # another order too
    sub_groups = [groups[i] for i in keep]
    sub_splits = group_split([labels[i] for i in keep], sub_groups, ratios, seed=0)
    assert len(set(sub_groups)) > 800
    assert all(full[g] == s for g, s in zip(sub_groups, sub_splits, strict=True))
    assert set(sub_splits) == {"train", "val", "test"}


def test_group_position_is_a_stable_hash_of_seed_and_key() -> None:
    """Pinned values: a change of the hash would move every group of every shipped manifest."""
    assert group_position("benign (1).png", 0) == group_position("benign (1).png", 0)
    assert group_position("benign (1).png", 0) != group_position("benign (1).png", 1)
    digest = hashlib.sha256(b"0\0benign (1).png").digest()
    assert group_position("benign (1).png", 0) == int.from_bytes(digest[:8], "big") / 2.0**64
    assert all(0 <= group_position(f"g{i}", 3) < 1 for i in range(1000))
    assert group_position("benign (1).png", 0) == 0.022591010941317224  # -> train
    assert group_position("ISIC_0024306.jpg", 0) == 0.8073283724439833  # -> val


def test_few_groups_still_fill_every_split() -> None:
    """Three groups and three splits: chance may leave one empty; the nearest group moves."""
    for seed in range(20):
        splits = group_split(["a"] * 3, ["x", "y", "z"], DEFAULT_RATIOS, seed)
        assert sorted(splits) == ["test", "train", "val"]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    labels, groups = _data()
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = group_split(labels, groups, ratios, seed=1)
    assert a == group_split(labels, groups, ratios, seed=1)
    assert a != group_split(labels, groups, ratios, seed=2)


def test_zero_ratio_leaves_split_empty() -> None:
    labels, groups = _data()
    splits = group_split(labels, groups, {"train": 0.8, "val": 0.2, "test": 0.0}, seed=0)
    assert set(splits) == {"train", "val"}


def test_too_few_groups_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="cannot fill 3 splits"):
        group_split(["a", "a"], ["g", "h"], {"train": 0.4, "val": 0.3, "test": 0.3}, seed=0)


def test_bad_ratios() -> None:
    with pytest.raises(ConfigError, match="unknown split"):
        check_ratios({"train": 1.0, "holdout": 0.2})
    with pytest.raises(ConfigError, match="non-negative"):
        check_ratios({"train": -1.0, "val": 0.5})


def test_carve_validation_keeps_official_test_and_groups() -> None:
    labels, groups = _data()
    official = ["test" if int(g[1:]) % 5 == 0 else "train" for g in groups]
    out = carve_validation(labels, groups, official, val_ratio=0.15, seed=0)
    assert [s for s, o in zip(out, official, strict=True) if o == "test"] == [
        "test"
    ] * official.count("test")
    assert "val" in out
    by_group: dict[str, set[str]] = {}
    for g, s in zip(groups, out, strict=True):
        by_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())


@pytest.mark.parametrize(
    "ratios", [{"train": 0.8, "val": 0.15, "test": 0.15}, {"train": 7, "val": 1.5, "test": 1.5}]
)
def test_ratios_that_do_not_sum_to_one_are_refused_not_rescaled(ratios: dict) -> None:
    with pytest.raises(ConfigError, match=r"split ratios \(train .*\) sum to [0-9.]+, not 1"):
        check_ratios(ratios)
    assert check_ratios({"train": 0.333, "val": 0.333, "test": 0.334})["test"] == 0.334
    assert check_ratios({"train": 0.8, "val": 0.2}) == {"train": 0.8, "val": 0.2, "test": 0.0}
