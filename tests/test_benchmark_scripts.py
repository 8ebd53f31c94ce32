"""The benchmark scripts run end to end at toy scale on tiny synthetic datasets in tmp_path.

The full benchmarks take hours; these check that each one runs, resumes and writes its
Markdown section, so that a long run does not die at its report.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

from medtl.artifacts import ModelCard, file_sha256
from medtl.data.prepare import prepare
from medtl.demo import make_phantom
from medtl.finetune.defaults import defaults_for
from medtl.pipeline import model_dir
from tests.conftest import write_png

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package); its folder is on the
    path, as when ``python benchmarks/<name>.py`` runs it, so a script can use another's helper."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def skip_without_imagenet_wheel() -> None:
    from medtl.sources import SOURCES

    source = SOURCES.get("imagenet:efficientnet_lite0")()
    if importlib.util.find_spec(source.package) is None:
        pytest.skip(f"{source.pip} is not installed")


def toy_sets(*extra: str) -> list[str]:
    """``--set`` arguments for a toy-scale run of a recipe benchmark (``extra`` first)."""
    tiny = [
        *extra, "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.picture_every=0",
        "finetune.epochs=1", "finetune.batch_size=8", "finetune.warmup_epochs=0",
        "evaluate.n_boot=100",
    ]  # fmt: skip
    return [x for o in tiny for x in ("--set", o)]


def rerun_report_only(script: ModuleType, argv: list[str], finished: Path, marker: str) -> Any:
    """``script.main`` again with ``--report-only``: the finished file is not rewritten and the
    Markdown file holds the section once (``marker``: its start); what ``main`` returned."""
    before = finished.stat().st_mtime_ns
    again = script.main([*argv, "--report-only"])
    assert finished.stat().st_mtime_ns == before
    out = Path(argv[argv.index("--out-results") + 1])
    assert out.read_text(encoding="utf-8").count(marker) == 1
    return again


def phantom(tmp: Path) -> tuple[Path, Path]:
    """24 synthetic ultrasound phantoms (benign / malignant) and their manifest."""
    root = make_phantom(tmp / "phantom", n=24, size=32, seed=0, duplicates=0)
    manifest = prepare("folder", root, tmp / "phantom.csv", workers=1).manifest_path
    return root, manifest


def fake_breastmnist(tmp: Path) -> tuple[Path, Path]:
    """A BreastMNIST-shaped ``breastmnist.npz`` (28 px, labels ``(N, 1)``, both classes in
    every split) and its manifest from the ``medmnist`` adapter (official split)."""
    rng = np.random.default_rng(0)
    root = tmp / "medmnist"
    root.mkdir()
    arrays = {}
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[labels == 0, 10:18, 10:18] = 0  # a dark "lesion" in class 0 (malignant)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(root / "breastmnist.npz", **arrays)
    manifest = prepare("medmnist", root / "breastmnist.npz", tmp / "bm.csv", workers=1)
    assert manifest.manifest.classes == ["malignant", "normal, benign"]
    return root, manifest.manifest_path


@pytest.mark.slow
def test_finetune_compare_tiny(tmp_path: Path) -> None:
    """Every arm on a fake BreastMNIST at toy scale (1 seed, 1 epoch, a 2-member 1-generation
    search per schedule): rows with CIs, the schedules' table, figure and verdicts, the compute
    table; a rerun trains nothing, and --report-only marks what never ran as "not run"."""
    root, manifest = fake_breastmnist(tmp_path)
    results, perf = tmp_path / "docs" / "results.md", tmp_path / "docs" / "performance.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nkept text\n", encoding="utf-8")
    tiny = [
        "data.loader.image_size=32", "finetune.epochs=1", "finetune.batch_size=8",
        "finetune.warmup_epochs=0", "evaluate.n_boot=100", "search.population=2",
        "search.elite=1", "search.generations=1", "search.max_epochs=1", "search.min_epochs=1",
        "search.poll_seconds=0.1",
    ]  # fmt: skip
    argv = [
        "--datasets", "breastmnist", "--seeds", "0", "--search-seeds", "0",
        "--data-root", f"breastmnist={root}", "--manifest", f"breastmnist={manifest}",
        "--work", str(tmp_path / "work"), "--out-results", str(results),
        "--out-compute", str(perf), "--device", "cpu", *[x for o in tiny for x in ("--set", o)],
    ]  # fmt: skip
    script = load_script("finetune_compare")
    runs = script.main(argv)
    assert [r["arm"] for r in runs] == list(script.ARMS)
    text = results.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nkept text\n")
    for arm in script.ARMS:
        assert re.search(rf"^\| breastmnist \| {arm} \| 0 \| \d\.\d+ \[", text, re.M), arm
    for schedule in ("reference", "halving"):  # a 2-candidate search, read through the API
        assert re.search(rf"^\| breastmnist \| 0 \| {schedule} \| \d\.\d{{4}} \| (\d+\.\d|never) \| [–\d., ]+ \| \d+\.\d \| 2 \(", text, re.M)  # fmt: skip
    assert re.search(r"^- breastmnist: search seed 0: (\d\.\d{3}|never): \*\*(met|not met)\*\*", text, re.M)  # fmt: skip
    assert "**Target 1**" in text and "not met**. Ratios" in text  # one dataset of two
    assert "- breastmnist: not measured (fewer than 2 finished `full` seeds)" in text
    assert (results.parent / "img" / script.FIGURE).stat().st_size > 0
    halving = next(r for r in runs if r["arm"] == "biotune_halving")
    assert halving["search"].schedule == "halving" and halving["search"].finished
    assert halving["search_ee"] > 0 and halving["train_ee"] > 0
    linear, full = (next(r for r in runs if r["arm"] == a) for a in ("linear", "full"))
    assert 0 < linear["train_ee"] < full["train_ee"]  # a frozen backbone runs forward only
    compute = perf.read_text(encoding="utf-8")
    assert script.COMPUTE[0] in compute and "| breastmnist | biotune_halving | 1 | " in compute
    assert "| breastmnist | full | 1 | 0.0 | " in compute  # no search

    evaluation = tmp_path / "work/breastmnist/full/seed0/evaluate/evaluation.json"
    before = evaluation.stat().st_mtime_ns
    again = script.main(argv)  # everything finished: nothing retrains or re-evaluates
    assert evaluation.stat().st_mtime_ns == before
    assert [r["metrics"] for r in again] == [r["metrics"] for r in runs]
    assert results.read_text(encoding="utf-8").count(script.RESULTS[0]) == 1

    script.main([*argv, "--seeds", "0", "1", "--report-only"])
    assert not (tmp_path / "work/breastmnist/full/seed1").exists()
    text = results.read_text(encoding="utf-8")
    assert "| breastmnist | lpft | 1 | not run | not run | | | |" in text


def test_finetune_compare_goes_on_past_a_failed_arm_but_stops_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An arm whose ``medtl run`` raises is reported and the next arm runs; an interrupted one
    (exit 130) stops the benchmark. Every arm gets the ImageNet start and its own overrides;
    ``search.*`` overrides reach the BioTune arms only, ``pretrain.*`` ones no arm."""
    script = load_script("finetune_compare")
    calls: list[list[str]] = []

    def fake(argv: list[str]) -> int:
        calls.append(argv)
        if "finetune.strategy=linear" in argv:
            raise RuntimeError("CUDA out of memory")
        return 130 if "finetune.strategy=lora" in argv else 0

    monkeypatch.setattr(script, "medtl", fake)
    out = ["--work", str(tmp_path / "w"), "--out-results", str(tmp_path / "r.md")]
    out += ["--out-compute", str(tmp_path / "p.md"), "--set", "search.generations=2"]
    out += ["--search-seeds", "0", "--set", "pretrain.epochs=1"]
    arms = ["linear", "biotune_halving", "full"]
    assert script.main(["--datasets", "busi", "--seeds", "0", "--arms", *arms, *out]) == []
    assert len(calls) == 3  # past the failed arm; nothing finished, so nothing tabulated
    for argv, arm in zip(calls, arms, strict=True):
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert "finetune.weights=imagenet:efficientnet_lite0" in sets and "seed=0" in sets
        assert ("search.generations=2" in sets) == (arm == "biotune_halving")
        assert ("search.seed=0" in sets) == (arm == "biotune_halving")
        assert "pretrain=" in sets and "pretrain.epochs=1" not in sets
    assert "| busi | linear | 0 | not run |" in (tmp_path / "r.md").read_text(encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        script.main(["--datasets", "busi", "--seeds", "0", "--arms", "lora", "full", *out])
    assert "finetune.strategy=full" not in calls[-1]


def _record(schedule: str, stages: list[list[tuple[float, float]]]) -> Any:
    """A finished search of one rung: per generation, each member's (fitness, epoch-eq.)."""
    from medtl.finetune import search as bt

    def row(g: int, i: int, f: float, ee: float) -> bt.Trial:
        return bt.Trial(
            id=2 * g + i, generation=g, idx=i, rung=0, seed=0, genome=(0.5, 0.5),
            genome_key=f"{g}-{i}", budget_epochs=1, first_trainable=0, status="done",
            reused=False, val_bacc=1 - f, fitness=f, trainable_fraction=1.0, cached=False,
            epochs_trained=ee, epoch_cost=1.0, epoch_equivalents=ee, seconds=1.0, worker=None,
            heartbeat=None, error=None,
        )  # fmt: skip

    rows = [row(g, i, f, ee) for g, ms in enumerate(stages) for i, (f, ee) in enumerate(ms)]
    states = {t.id: "COMPLETE" for t in rows}
    return bt.SearchRecord(schedule, 2, len(stages), 0, 3, tuple(rows), states)


def test_finetune_compare_targets_as_worked_by_hand() -> None:
    """Target 1 from the searches' stage curves, target 2 from mean test AUROC against full's
    seed spread, on numbers worked out by hand."""
    script = load_script("finetune_compare")
    # reference: best 0.3 after 8, then 0.25 after 16 epoch-equivalents: F = 0.25, cost 16
    ref = _record("reference", [[(0.4, 4.0), (0.3, 4.0)], [(0.25, 4.0), (0.35, 4.0)]])
    fast = _record("halving", [[(0.2, 2.0), (0.5, 1.0)]])  # reaches 0.25 after 3: 3/16
    slow = _record("halving", [[(0.3, 2.0), (0.5, 1.0)], [(0.25, 3.0), (0.4, 1.0)]])  # 7/16
    never = _record("halving", [[(0.3, 1.0), (0.5, 1.0)]])

    def runs(*searches: tuple[str, int, Any]) -> list[dict[str, Any]]:
        return [{"arm": arm, "seed": seed, "search": rec} for arm, seed, rec in searches]

    pairs = script.schedule_pairs(runs(("biotune_reference", 0, ref), ("biotune_halving", 0, fast)))
    assert [(p["ref"], p["halving"], p["ratio"]) for p in pairs] == [(16.0, 3.0, 3 / 16)]
    assert script.target1("busi", pairs) == ("- busi: search seed 0: 0.188: **met**", True)
    pairs = script.schedule_pairs(runs(
        ("biotune_reference", 0, ref), ("biotune_halving", 0, fast),
        ("biotune_reference", 1, ref), ("biotune_halving", 1, slow),
        ("biotune_reference", 2, ref), ("biotune_halving", 2, never),
        ("biotune_reference", 3, ref),  # no halving search of seed 3: no pair
    ))  # fmt: skip
    assert [p["ratio"] for p in pairs] == [3 / 16, 7 / 16, None]
    line, met = script.target1("busi", pairs)
    assert not met and line.endswith("seed 1: 0.438, search seed 2: never: **not met**")
    assert script.target1("busi", []) == (
        "- busi: not measured (no search seed has both schedules finished)",
        False,
    )

    def scored(arm: str, *aurocs: float) -> list[dict[str, Any]]:
        return [{"arm": arm, "metrics": {"macro_auroc": {"value": v}}} for v in aurocs]

    full = scored("full", 0.80, 0.84, 0.82)  # mean 0.82, SD 0.02
    lines, busi = script.target2(
        "busi", full + scored("biotune_reference", 0.83, 0.85) + scored("biotune_halving", 0.81)
    )
    assert busi == {"biotune_reference": "better", "biotune_halving": "within"}
    assert lines[0].endswith("vs full 0.820 ± 0.020 (SD, 3 seeds): +0.020, better")
    assert lines[1].endswith(": -0.010, within the spread")
    lines, bm = script.target2("bm", full + scored("biotune_halving", 0.78, 0.80))
    assert bm == {"biotune_halving": "worse"} and lines[0] == "- bm biotune_reference: not run"
    assert lines[1].endswith(": -0.030, worse than the spread")
    assert script.target2("bm", scored("full", 0.8)) == (
        ["- bm: not measured (fewer than 2 finished `full` seeds)"],
        {},
    )
    # met: better on one dataset at least, worse by more than the spread on none
    assert script.target2_verdict("biotune_reference", [busi]) == "biotune_reference: **met**"
    assert script.target2_verdict("biotune_halving", [busi]) == "biotune_halving: **not met**"
    assert script.target2_verdict("biotune_halving", [busi, bm]).endswith("**not met**")
    assert script.target2_verdict("biotune_reference", [busi, bm]).endswith(
        "not measured on every dataset"
    )


@pytest.mark.slow
def test_pretrain_benefit_tiny(tmp_path: Path) -> None:
    """Every arm at toy scale on a BreastMNIST-shaped file: per-run rows with CIs, the paired
    entropy - random row, the mask-unit and corpus tables, the ensemble; a rerun trains nothing;
    --report-only marks what never ran."""
    import shutil

    skip_without_imagenet_wheel()
    root, manifest = fake_breastmnist(tmp_path)
    corpus = tmp_path / "corpus"
    (corpus / "medmnist").mkdir(parents=True)
    shutil.copy(root / "breastmnist.npz", corpus / "medmnist")  # its val / test: left out
    write_png(corpus / "other" / "scan.png", (40, 30), seed=1)
    write_png(corpus / "other" / "scan_mask.png", (40, 30), seed=2)  # never an image
    out = tmp_path / "results.md"
    argv = [
        "--datasets", "breastmnist", "--seeds", "0", "--data-root", f"breastmnist={root}",
        "--manifest", f"breastmnist={manifest}", "--corpus-root", str(corpus), "--device", "cpu",
        "--work", str(tmp_path / "work"), "--out-results", str(out),
        *toy_sets("pretrain.decoder_dim=16"),
    ]  # fmt: skip
    script = load_script("pretrain_benefit")
    script.main(argv)
    text = out.read_text(encoding="utf-8")
    for arm in ("imagenet", "imagenet_mae_entropy", "imagenet_mae_random", "imagenet_mae_corpus",
                "imagenet_mae_unit16", "ensemble"):  # fmt: skip
        assert re.search(rf"^\| breastmnist \| {arm} \| 0 \| \d\.\d+ \[", text, re.M), arm
    assert re.search(r"^\| breastmnist \| 0 \| [+-]\d\.\d{3} \| ", text, re.M)  # paired
    assert re.search(
        r"^\| breastmnist \| validation prefers \| \| \*\*(32 \(default\)|16)\*\*", text, re.M
    )
    # the corpus: the npz's 16 train images and the scan; val / test arrays not read (train only)
    assert re.search(
        r"^\| breastmnist \| `folder:<corpus root>` \| 1 \| 1 \| 0 \| 0 \| 0 \|", text, re.M
    )
    assert re.search(
        r"^\| breastmnist \| `npz:<corpus root>/medmnist/breastmnist.npz` \| 16 \| 16 \|",
        text,
        re.M,
    )
    assert "**Partial:" in text and "busi imagenet seed 0" in text  # BUSI never ran
    assert re.search(r"imagenet_mae_entropy >= imagenet \+ 0\.01 .*\*\*(met|not met)\*\*", text)
    result = tmp_path / "work/breastmnist/imagenet_mae_entropy/seed0/result.json"
    rerun_report_only(script, argv, result, script.RESULTS[0])


@pytest.mark.slow
def test_breastmnist_recipes_tiny(tmp_path: Path) -> None:
    """Two seeds of the ResNet-18 recipe at toy scale: per-seed rows with CIs, the ensemble of
    both, the verdict; a second call with ``--report-only`` trains nothing and says the same."""
    root, manifest = fake_breastmnist(tmp_path)
    out = tmp_path / "results.md"
    tiny = [
        f"data.manifest={manifest}", "finetune.backbone=medtl_tiny_convnext",
        "data.loader.image_size=32", "finetune.epochs=1", "finetune.batch_size=8",
        "evaluate.n_boot=100",
    ]  # fmt: skip
    argv = [
        "--recipes", "breastmnist_resnet18", "--seeds", "0", "1", "--data-root", str(root),
        "--work", str(tmp_path / "work"), "--out-results", str(out),
        *[x for o in tiny for x in ("--set", o)],
    ]  # fmt: skip
    script = load_script("breastmnist_recipes")
    script.main(argv)
    text = out.read_text(encoding="utf-8")
    for seed in ("0", "1", "ensemble of 2"):
        assert re.search(rf"^\| `breastmnist_resnet18` \| {seed} \| \d\.\d+ \[", text, re.M), seed
    assert re.search(r"\*\*Target \(best recipe beats .*\): (met|not met)\*\*", text)
    evaluation = tmp_path / "work/breastmnist_resnet18/ensemble/evaluation.json"
    rerun_report_only(script, argv, evaluation, script.MARKERS[0])


def test_duplicate_pairs_draws_the_pairs_the_dct_hash_adds(tmp_path: Path) -> None:
    """A smooth scan, a copy of it cropped by 2 pixels and resized back, and an unrelated image:
    exactly the one pair within 40 DCT bits is drawn, on one sheet."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    (tmp_path / "a").mkdir()
    for name, seed in (("scan", 0), ("other", 1)):
        field = gaussian_filter(np.random.default_rng(seed).normal(size=(128, 128)), 6)
        field = (field - field.min()) / (field.max() - field.min())
        Image.fromarray((field * 255).astype(np.uint8)).save(tmp_path / "a" / f"{name}.png")
    scan = Image.open(tmp_path / "a" / "scan.png")
    scan.crop((2, 2, 128, 128)).resize((128, 128), Image.BILINEAR).save(tmp_path / "a" / "copy.png")
    module = load_script("duplicate_pairs")
    items, pairs = module.pairs_in_band("folder", tmp_path, {}, 0, 40, new_only=False)
    assert [{items[a].key, items[b].key} for _, _, a, b in pairs] == [{"a/scan.png", "a/copy.png"}]
    module.main(["folder", str(tmp_path), "--bits", "0:40", "--out", str(tmp_path / "sheets")])
    assert [p.name for p in (tmp_path / "sheets").iterdir()] == ["pairs_00.png"]


def test_first_rung_compares_rules_as_worked_by_hand(tmp_path: Path) -> None:
    first_rung = load_script("first_rung")
    # [val_bacc, val_loss] per epoch. At epoch 1 all three sit at chance (a three-way tie in
    # balanced accuracy) while their losses already order them as their full runs end.
    runs = [
        [[0.5, 0.60], [0.9, 0.30]],  # full-run fitness 0.1
        [[0.5, 0.65], [0.7, 0.50]],  # 0.3
        [[0.5, 0.70], [0.6, 0.55]],  # 0.4
    ]
    rows = {(r["rung"], r["rule"]): r for r in first_rung.compare(runs, [1, 2], eta=3)}
    bacc, loss = rows[(1, "val_bacc")], rows[(1, "val_loss")]
    assert bacc["tied"] == 3 and bacc["rho"] is None  # a constant ranks nothing
    assert loss["tied"] == 0 and loss["rho"] == pytest.approx(1.0)
    assert bacc["regret"] == loss["regret"] == 0.0  # ties go by index: run 0 happens to lead
    assert rows[(2, "val_bacc")]["rho"] == pytest.approx(1.0)
    reordered = [runs[2], runs[1], runs[0]]  # now the index puts the worst run first
    rows = {(r["rung"], r["rule"]): r for r in first_rung.compare(reordered, [1], eta=3)}
    assert rows[(1, "val_bacc")]["regret"] == pytest.approx(0.3)
    assert rows[(1, "val_loss")]["regret"] == 0.0


@pytest.mark.slow
def test_transfer_tiny(tmp_path: Path) -> None:
    """Every arm and the ensemble on a fake BreastMNIST at toy scale, one seed: rows with CIs,
    the ensemble's validation-chosen weights, the compute table; ``--report-only`` trains and
    evaluates nothing and writes the same rows."""
    root, manifest = fake_breastmnist(tmp_path)
    results, perf = tmp_path / "results.md", tmp_path / "performance.md"
    tiny = [
        f"data.manifest={manifest}", "pretrain.epochs=1", "pretrain.batch_size=8",
        "finetune.epochs=1", "finetune.batch_size=8", "finetune.warmup_epochs=0",
        "evaluate.n_boot=100",
    ]  # fmt: skip
    argv = [
        "--datasets", "breastmnist", "--seeds", "0", "--data-root", f"breastmnist={root}",
        "--work", str(tmp_path / "work"), "--out-results", str(results),
        "--out-compute", str(perf), *[x for o in tiny for x in ("--set", o)],
    ]  # fmt: skip
    script = load_script("transfer")
    first = script.main(argv)
    arms = [r["arm"] for r in first["breastmnist"]]
    assert arms == [*script.ARMS, "ensemble"]
    text = results.read_text(encoding="utf-8")
    for arm in arms:
        assert re.search(rf"^\| breastmnist \| {arm} \| 0 \| \d\.\d+ \[", text, re.M), arm
    # members never picked on validation get weight 0 and are not listed
    assert re.search(r"\| weights: (imagenet_lite0|mae_entropy) \d\.\d\d", text)
    assert re.search(r"mean test macro_auroc .* \*\*(met|not met)\*\*", text)
    card = json.loads((tmp_path / "work/breastmnist/ensemble/seed0/ensemble.json").read_text())
    assert card["chosen_on"] == "val"
    evaluation = tmp_path / "work/breastmnist/ensemble/seed0/evaluation.json"
    again = rerun_report_only(script, argv, evaluation, script.RESULTS[0])
    assert [r["metrics"] for r in again["breastmnist"]] == [
        r["metrics"] for r in first["breastmnist"]
    ]
    # --arms ensemble alone combines its members' finished runs and runs none of them again
    log = tmp_path / "work/breastmnist/mae_entropy/seed0/log.jsonl"
    before = log.read_text(encoding="utf-8")
    only = script.main([*argv, "--arms", "ensemble"])
    assert [r["arm"] for r in only["breastmnist"]] == ["ensemble"]
    assert only["breastmnist"][0]["metrics"] == first["breastmnist"][-1]["metrics"]
    assert log.read_text(encoding="utf-8") == before
    script.main([*argv, "--report-only"])  # the compute table of every arm again
    # the scratch and ImageNet arms pretrain nothing, though --set pretrain.epochs=1 is given
    compute = perf.read_text(encoding="utf-8")
    for arm in ("scratch", "imagenet_lite0", "imagenet_lite2", "imagenet_lite0_hires", "recipe"):
        assert f"| breastmnist | {arm} | 0 | 0 |" in compute, arm
    # the recipe arm pins nothing: it fine-tunes with the pretrained start's defaults
    card = ModelCard.load(model_dir(tmp_path / "work/breastmnist/recipe/seed0") / "meta.json")
    assert card.config["augment"] == defaults_for("pretrained")["augment"]
    pinned = ModelCard.load(
        model_dir(tmp_path / "work/breastmnist/imagenet_lite0/seed0") / "meta.json"
    )
    assert pinned.config["augment"] == "light"
    # the raised-resolution arm trains at its size; the others at the recipe's
    recipes = {a: tmp_path / f"work/breastmnist/{a}/seed0/recipe.yaml" for a in ("imagenet_lite0", "imagenet_lite0_hires")}  # fmt: skip
    sizes = {a: yaml.safe_load(p.read_text())["data"]["loader"]["image_size"] for a, p in recipes.items()}  # fmt: skip
    assert sizes == {"imagenet_lite0": 64, "imagenet_lite0_hires": script.HIRES["breastmnist"]}
    assert not (tmp_path / "work/breastmnist/scratch/seed0/pretrain").exists()
    # an MAE arm pretrains one encoder, which its seeds' runs fine-tune from that file
    for arm in script.MAE_ARMS:
        encoder = tmp_path / f"work/breastmnist/{arm}/encoder/pretrain/encoder.safetensors"
        assert not (tmp_path / f"work/breastmnist/{arm}/seed0/pretrain").exists(), arm
        card = ModelCard.load(model_dir(tmp_path / f"work/breastmnist/{arm}/seed0") / "meta.json")
        assert card.weights is not None and card.weights.sha256 == file_sha256(encoder), arm
        assert re.search(rf"^\| breastmnist \| {arm} \| 0 \| [1-9]\d* \| ", compute, re.M), arm


def test_cpu_speed_tiny(tmp_path: Path) -> None:
    """One step of each setting on a tiny classifier: a row per setting with its range."""
    out = tmp_path / "performance.md"
    argv = [
        "--data-root", str(tmp_path / "absent"), "--kinds", "finetune:medtl_tiny_convnext",
        "--size", "32", "--batch-size", "2", "--steps", "1", "--repeats", "2",
        "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    results = load_script("cpu_speed").main(argv)
    (by_variant,) = results.values()
    assert set(by_variant) == {"fp32", "channels-last", "bf16 autocast", "channels-last + bf16"}
    assert all(len(r["rates"]) == 2 and r["median"] > 0 for r in by_variant.values())
    text = out.read_text(encoding="utf-8")
    assert re.search(
        r"^\| finetune:medtl_tiny_convnext \| 1 \| bf16 autocast \| [\d.]+ \| ", text, re.M
    )
    assert "shared with other processes" in text


def test_code_size_counts_functions_with_their_decorators_and_modules(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text(
        "import functools\n\n\n@functools.cache\ndef f():\n    x = 1\n    return x\n"
    )
    (pkg / "sub" / "b.py").write_text("class C:\n    def m(self):\n        pass\n")
    sizes = load_script("code_size").main([str(pkg), "--json", str(tmp_path / "s.json")])
    assert sizes["functions"] == [(4, f"{pkg / 'a.py'}:5 f"), (2, f"{pkg / 'sub' / 'b.py'}:2 m")]
    assert sizes["modules"] == [(7, str(pkg / "a.py")), (3, str(pkg / "sub" / "b.py"))]
    assert json.loads((tmp_path / "s.json").read_text())["modules"][0] == [7, str(pkg / "a.py")]


def test_pretrain_benefit_mask_unit_choice_counts_a_zero_validation_auroc() -> None:
    """A validation AUROC of 0.0 is a measurement, not a missing one: the 16 px unit's 0.5
    beats the default's 0.0 and the table says which validation prefers."""
    import argparse

    script = load_script("pretrain_benefit")
    args = argparse.Namespace(datasets=["breastmnist"])
    runs = {
        arm: {"val_auroc": auc, "val_bacc": 0.5}
        for arm, auc in (("imagenet_mae_entropy", 0.0), ("imagenet_mae_unit16", 0.5))
    }
    lines = script.unit_table(args, {"breastmnist": {0: runs}})
    assert "| breastmnist | validation prefers | | **16** | |" in lines
    runs["imagenet_mae_unit16"]["val_auroc"] = None  # no AUROC: a class absent from validation
    lines = script.unit_table(args, {"breastmnist": {0: runs}})
    assert not any("validation prefers" in line for line in lines)


def test_pretrain_benefit_calls_entropy_a_winner_only_with_a_significant_seed() -> None:
    """Ahead on the mean with no seed DeLong-significant is "not shown", not "met"; one
    significant seed in favour (none against) is met; a significant seed against is not met."""
    script = load_script("pretrain_benefit")

    def pair(diff: float, p: float) -> dict:
        return {"macro_difference": diff, "delong": {"difference": diff, "p_value": p}}

    assert "**not shown" in script.beats([pair(0.01, 0.7), pair(0.02, 0.6), pair(-0.01, 0.8)])
    assert "**met**" in script.beats([pair(0.01, 0.7), pair(0.05, 0.01), pair(-0.01, 0.8)])
    assert "**not met**" in script.beats([pair(0.03, 0.7), pair(0.05, 0.2), pair(-0.02, 0.01)])
    assert "**not met**" in script.beats([pair(-0.01, 0.7), pair(-0.02, 0.6), pair(0.01, 0.8)])


def test_recipe_starts_tiny(tmp_path: Path) -> None:
    """The BreastMNIST recipe's two presets at toy scale: a row each with validation figures,
    the ImageNet one without a pretraining stage, the choice made on validation."""
    skip_without_imagenet_wheel()
    root, _ = fake_breastmnist(tmp_path)
    out = tmp_path / "results.md"
    argv = [
        "--datasets", "breastmnist", "--data-root", f"breastmnist={root}", "--device", "cpu",
        "--work", str(tmp_path / "work"), "--out-results", str(out),
        *toy_sets("data.manifest=null"),
    ]  # fmt: skip
    script = load_script("recipe_starts")
    results = script.main(argv)
    text = out.read_text(encoding="utf-8")
    for preset, backbone in (("cpu", "efficientnet_lite0"), ("mae_scratch", "convnext_atto")):
        assert re.search(
            rf"^\| `breastmnist` \(medmnist\) \| `{preset}` \| `{backbone}` \| 1 \| ", text, re.M
        )
    assert not (tmp_path / "work/breastmnist/cpu/seed0/pretrain").exists()
    assert (tmp_path / "work/breastmnist/mae_scratch/seed0/pretrain/DONE").is_file()
    assert text.count("**yes**") == 1
    runs = results["breastmnist"]
    best = max(runs, key=lambda p: (runs[p][0]["val_auroc"] or 0.0, runs[p][0]["val_bacc"]))
    assert re.search(rf"`{best}` .*\*\*yes\*\* \|$", text, re.M)
