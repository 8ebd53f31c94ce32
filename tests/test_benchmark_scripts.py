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

import numpy as np
import pytest

from medtl.data.prepare import prepare
from medtl.demo import make_phantom

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
def test_finetune_compare_dry_run(tmp_path: Path) -> None:
    busi_root, busi_manifest = phantom(tmp_path)
    bm_root, bm_manifest = fake_breastmnist(tmp_path)
    results, perf = tmp_path / "docs" / "results.md", tmp_path / "docs" / "performance.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nkept text\n", encoding="utf-8")
    argv = [
        "--dry-run-tiny", "--seeds", "0",
        "--busi-root", str(busi_root), "--busi-manifest", str(busi_manifest),
        "--breastmnist-root", str(bm_root), "--breastmnist-manifest", str(bm_manifest),
        "--work", str(tmp_path / "work"),
        "--out-results", str(results), "--out-performance", str(perf),
    ]  # fmt: skip
    script = load_script("finetune_compare")
    script.main(argv)

    text = results.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nkept text\n")
    section = text[text.index(script.RESULTS_MARKERS[0]) : text.index(script.RESULTS_MARKERS[1])]
    for title in ("### BUSI", "### BreastMNIST"):
        assert title in section
    for strategy in script.STRATEGIES:  # every strategy finished on both datasets
        rows = re.findall(rf"^\| {strategy} \| 0 \| (\S+) \[", section, flags=re.M)
        assert len(rows) == 2, f"{strategy}: no test AUROC with a CI on both datasets"
    assert "| ResNet-18 (28) | 0.901 | 0.863 |" in section
    assert "| Google AutoML Vision | 0.919 | 0.861 |" in section
    assert len(re.findall(r"Whole searches, halving / reference: \d", section)) == 2
    assert len(re.findall(r"At equal validation fitness, search seed 0: .* (\*\*ratio \d|never)", section)) == 2  # fmt: skip
    assert len(re.findall(r"\*\*Target \(halving reaches .*: (met|not met) \(ratio", section)) == 2
    for name in ("busi", "breastmnist"):  # the anytime curves of both schedules
        figure = f"finetune_compare_{name}_schedules.png"
        assert f"(img/{figure})" in section and (results.parent / "img" / figure).is_file()
    assert re.search(r"\*\*Target \(best recipe beats ResNet-18 \(28\).*: (met|not met)\.\*\*", section)  # fmt: skip
    perf_text = perf.read_text(encoding="utf-8")
    assert script.PERF_MARKERS[0] in perf_text and "| BUSI | biotune-halving | 1 |" in perf_text

    summary = (
        tmp_path / "work/breastmnist/medtl_tiny_convnext/scratch/biotune-halving/seed0/summary.json"
    )
    saved = json.loads(summary.read_text(encoding="utf-8"))
    assert saved["search"]["trials"] == 2 and saved["epoch_equivalents"] > 0
    assert saved["search"]["epoch_equivalents_uncached"] > 0  # the reference code's price
    assert (summary.parent / "search" / "trials.db").is_file()

    before = summary.stat().st_mtime_ns
    script.main(argv)  # everything finished: runs are read back, the section replaced
    assert summary.stat().st_mtime_ns == before
    assert results.read_text(encoding="utf-8").count(script.RESULTS_MARKERS[0]) == 1

    # --report-only trains nothing: a seed never run is listed as missing, not trained
    script.main([*argv[:2], "0", "1", *argv[3:], "--report-only"])
    assert not (summary.parent.parent / "seed1").exists()
    text = results.read_text(encoding="utf-8")
    assert re.search(r"\*\*Partial: 12 of 24 runs have not been run yet\*\*", text)
    assert "breastmnist biotune-halving seed 1" in text

    # --search-seeds 0: seed 1 retrains search seed 0's genome, no second search
    script.main([*argv[:2], "0", "1", *argv[3:], "--datasets", "breastmnist", "--strategies",
                 "biotune-halving", "--search-seeds", "0"])  # fmt: skip
    seed1 = summary.parent.parent / "seed1"
    shared = json.loads((seed1 / "summary.json").read_text(encoding="utf-8"))
    assert shared["search"]["shared_from_seed"] == 0 and not (seed1 / "search").exists()
    assert shared["search"]["strategy_options"] == saved["search"]["strategy_options"]
    assert shared["epoch_equivalents"] > saved["search"]["epoch_equivalents"]  # search + retrain
    text = results.read_text(encoding="utf-8")
    assert "| biotune-halving | 1 (genome of search 0) | " in text


@pytest.mark.slow
def test_pretrain_benefit_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, manifest = phantom(tmp_path)
    out = tmp_path / "results.md"
    argv = [
        "pretrain_benefit.py", "--data-root", str(root), "--manifest", str(manifest),
        "--backbone", "medtl_tiny_convnext", "--image-size", "32", "--pretrain-epochs", "1",
        "--finetune-epochs", "1", "--patience", "1", "--seeds", "0",
        "--work", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    load_script("pretrain_benefit").main()

    text = out.read_text(encoding="utf-8")
    for init in ("scratch", "random", "entropy"):
        assert re.search(rf"^\| {init} \| 0 \| \S+ \[", text, flags=re.M), init
    assert (tmp_path / "work/pretrain_entropy/encoder.safetensors").is_file()

    # the ablation: another temperature / random share, next to the main runs just made
    monkeypatch.setattr(sys, "argv", [*argv, "--ablation", "0.5:0.25"])
    load_script("pretrain_benefit").main()
    text = out.read_text(encoding="utf-8")
    assert text.count("<!-- pretrain_benefit:start -->") == 1
    assert re.search(r"^\| entropy \| 0\.5 \| 0\.25 \| \d\.\d{4} \| 1 \| ", text, flags=re.M)
    assert re.search(r"^\| scratch \| – \| – \| – \| 1 \| ", text, flags=re.M)  # quoted main run
    assert (tmp_path / "work/pretrain_entropy_T0.5_R0.25/encoder.safetensors").is_file()


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
    before = evaluation.stat().st_mtime_ns
    script.main([*argv, "--report-only"])
    assert evaluation.stat().st_mtime_ns == before
    assert out.read_text(encoding="utf-8").count(script.MARKERS[0]) == 1


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
    before = evaluation.stat().st_mtime_ns
    again = script.main([*argv, "--report-only"])
    assert evaluation.stat().st_mtime_ns == before
    assert [r["metrics"] for r in again["breastmnist"]] == [
        r["metrics"] for r in first["breastmnist"]
    ]
    # the scratch and ImageNet arms pretrain nothing, though --set pretrain.epochs=1 is given
    compute = perf.read_text(encoding="utf-8")
    for arm in ("scratch", "imagenet_lite0", "imagenet_lite2"):
        assert f"| breastmnist | {arm} | 0 | 0 |" in compute, arm
    assert not (tmp_path / "work/breastmnist/scratch/seed0/pretrain").exists()


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
