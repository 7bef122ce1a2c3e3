"""Cross-validation of a recipe: folds that are stratified, keep copies together and test every image
once; overrides checked as params are; a real run on a tiny folder; comparisons on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import crossval, statistics
from pipeline.cli import EXIT_USER_ERROR
from pipeline.errors import PipelineError
from pipeline.params import ParamsError
from tests.conftest import REPO_ROOT, make_image_folder, project_params


def _manifest(per_class: dict[str, int], group_size: int = 1) -> pd.DataFrame:
    rows = []
    for label, count in per_class.items():
        for i in range(count):
            rows.append({"path": f"{label}/{i}.png", "label": label, "group": f"{label}-{i // group_size}"})
    return pd.DataFrame(rows)


def test_folds_are_stratified_keep_groups_whole_and_test_every_image_once() -> None:
    manifest = _manifest({"cat": 60, "dog": 40}, group_size=2)
    parts = crossval.assign_folds(manifest, folds=5, seed=7)
    assert set(parts) == set(range(10))
    assert manifest.assign(part=parts).groupby("group")["part"].nunique().max() == 1   # copies together
    tested = []
    for fold in range(5):
        frame = crossval.fold_split(manifest, parts, fold, folds=5)
        shares = frame["split"].value_counts(normalize=True)
        assert shares["test"] == pytest.approx(0.2, abs=0.03) and shares["validation"] == pytest.approx(0.1, abs=0.03)
        for split in ("train", "test"):    # each split keeps the classes' 60:40 proportions
            labels = frame.loc[frame["split"] == split, "label"]
            assert (labels == "cat").mean() == pytest.approx(0.6, abs=0.06)
        assert not set(frame.loc[frame["split"] == "test", "group"]) & set(frame.loc[frame["split"] == "train", "group"])
        tested += frame.loc[frame["split"] == "test", "path"].tolist()
    assert sorted(tested) == sorted(manifest["path"])


def test_too_small_a_class_for_the_folds_is_one_clear_error() -> None:
    with pytest.raises(PipelineError, match=r"smallest class has 6 images; use fewer folds"):
        crossval.assign_folds(_manifest({"cat": 30, "dog": 6}), folds=5, seed=0)


def test_summary_gives_mean_spread_and_worst_fold() -> None:
    summary = crossval.summarise([{"test_accuracy": value} for value in (0.8, 0.9, 0.7)])
    assert summary == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1), "min": 0.7, "max": 0.9, "folds": 3}


def test_overrides_are_checked_like_params(tmp_path: Path) -> None:
    params, changes = crossval.recipe_params(REPO_ROOT / "params.yaml", ["photos"],
                                             ["train_custom.weight_decay=0.05", "augment.flip_average=true"])
    assert params.train_custom.weight_decay == 0.05 and params.augment.flip_average is True
    assert params.base.channels == 3                                      # the preset applied under them
    assert changes == {"train_custom.weight_decay": 0.05, "augment.flip_average": True}
    with pytest.raises(PipelineError, match=r"--set train_custom\.weight_decy: no such key"):
        crossval.recipe_params(REPO_ROOT / "params.yaml", [], ["train_custom.weight_decy=0.1"])
    with pytest.raises(ParamsError, match=r"train_custom\.weight_decay: must be in \[0, 1\)"):
        crossval.recipe_params(REPO_ROOT / "params.yaml", [], ["train_custom.weight_decay=2"])


def test_presets_are_layered_in_order() -> None:
    params, _ = crossval.recipe_params(REPO_ROOT / "params.yaml", ["photos", "unbalanced"], [])
    assert params.base.channels == 3 and params.train_custom.class_weight == "balanced"
    assert params.gate.metric == "balanced_accuracy"


def test_a_recipe_scored_in_balanced_accuracy_pools_it_over_the_folds() -> None:
    """Two folds of an unbalanced folder: the pooled figure is the balanced accuracy of every answer,
    not the mean of the folds' nor the plain accuracy."""
    def fold(labels: list[int], predicted: list[int], start: int) -> dict:
        right = [int(a == b) for a, b in zip(labels, predicted)]
        return {"test_label": labels, "test_predicted": predicted, "test_right": right,
                "test_paths": [f"{start + i}.png" for i in range(len(labels))]}

    result = {"metric": "balanced_accuracy",
              "folds": [fold([0, 0, 0, 0, 1], [0, 0, 0, 0, 0], 0), fold([0, 0, 0, 1, 1], [0, 0, 1, 1, 1], 5)]}
    pooled = crossval.pooled(result)
    assert pooled["score"] == pytest.approx((6 / 7 + 2 / 3) / 2)          # per class: 6 of 7, 2 of 3 right
    assert pooled["ci95"][0] <= pooled["score"] <= pooled["ci95"][1]
    assert crossval.pooled({"folds": result["folds"]})["score"] == pytest.approx(0.8)   # old files: accuracy


def test_the_prediction_bound_is_beaten_by_one_more_run_nineteen_times_in_twenty() -> None:
    """Five folds' scores and a sixth drawn alike: the sixth falls under the bound about 5 % of the time
    (with the normal distribution's z in place of Student's t, almost twice as often)."""
    draws = np.random.default_rng(0).normal(0.8, 0.03, size=(2000, 6))
    under = np.mean([sixth < crossval.prediction_bound(five) for *five, sixth in draws])
    assert 0.035 < under < 0.065


def test_the_chance_to_pass_is_how_often_one_more_run_clears_a_threshold() -> None:
    scores = [0.70, 0.72, 0.74, 0.76, 0.78]
    assert crossval.chance_to_pass(scores, crossval.prediction_bound(scores)) == pytest.approx(0.95)
    assert crossval.chance_to_pass(scores, 0.74) == pytest.approx(0.5)        # the mean: one run in two
    assert crossval.chance_to_pass(scores, 0.88) < 0.01 < crossval.chance_to_pass(scores, 0.80) < 0.5
    assert crossval.chance_to_pass([0.8] * 5, 0.8) == 1.0 and crossval.chance_to_pass([0.8] * 5, 0.81) == 0.0


@pytest.mark.parametrize(("scores", "threshold"), [
    ([0.70, 0.72, 0.74, 0.76, 0.78], 0.66),        # mean 0.74 - t(0.95, 4) * sd * sqrt(1.2) = 0.666
    ([0.57] * 5, 0.57),                            # no spread: the score itself (0.57 * 100 is 56.99999999999999)
    ([0.90] * 29 + [0.80], 0.80),                  # the bound (0.865) is above the worst fold: the worst fold
    ([0.0, 0.1], 0.0),                             # never below 0
])
def test_suggested_thresholds_are_the_prediction_bound_or_the_worst_fold_rounded_down(scores, threshold) -> None:
    suggested = crossval.suggested_thresholds({"train": scores, "test": scores})
    assert suggested == {"min_train_score": threshold, "min_test_score": threshold}


def test_the_threshold_lines_say_what_the_folds_need_and_what_params_yaml_would_say() -> None:
    def fold(train: float, test: float) -> dict:
        return {"train_score": train, "test_score": test, "train_score_flip": train + 0.01,
                "test_score_flip": test + 0.01}

    result = {"metric": "accuracy", "folds": [fold(0.95, 0.80), fold(0.90, 0.78), fold(0.97, 0.83)]}
    params = crossval.recipe_params(REPO_ROOT / "params.yaml", ["photos"], [])[0]    # flip averaging on
    worst, suggestion, split, verdict, advice = crossval.threshold_lines("preset", result, params)
    assert ("worst fold accuracy train 0.9100, test 0.7900; one more run scores at least train 0.8284, "
            "test 0.7285 95% ") in worst
    assert worst.endswith("(with flip averaging, as the saved model answers)")
    assert "-S gate.min_train_score=0.82 -S gate.min_test_score=0.72" in suggestion
    # Three folds test a third each: the thresholds hold for a split of those shares.
    assert "-S 'split.ratios=[0.5,0.166667,0.333333]' (these params split [0.8, 0.1, 0.1])" in split
    assert verdict.endswith("(train 0.85, test 0.80) would call a model as good as the worst fold: overfit; "
                            "one more run clears its train threshold 93% of the time, its test threshold 65%")
    assert "pretrained weights" in advice
    # Split as the folds were, to four places: no split line.
    params = crossval.recipe_params(REPO_ROOT / "params.yaml", [], ["gate.min_train_score=0.95",
                                                                     "split.ratios=[0.5,0.1667,0.3333]"])[0]
    worst, suggestion, verdict, _ = crossval.threshold_lines("digits", result, params)
    assert "train 0.9000, test 0.7800; one more run" in worst and worst.endswith("(as trained)")
    assert verdict.endswith(": underfit; one more run clears its train threshold 42% of the time, "
                            "its test threshold 12%")
    # Exactly at a bound passes; a gate that decides on intervals judges the worst fold by its score.
    params = crossval.recipe_params(REPO_ROOT / "params.yaml", [],
                                    ["gate.min_test_score=0.78", "gate.confidence=0.95"])[0]
    *_, verdict = crossval.threshold_lines("digits", result, params)
    assert ": deploy; " in verdict


def test_fold_shares_are_what_each_fold_trains_stops_early_and_tests_on() -> None:
    assert crossval.fold_shares(5) == [0.7, 0.1, 0.2]
    manifest = pd.DataFrame({"label": ["a", "b"] * 50, "group": range(100)})
    parts = crossval.assign_folds(manifest, 5, seed=0)
    counts = crossval.fold_split(manifest, parts, 0, 5)["split"].value_counts(normalize=True)
    assert [counts["train"], counts["validation"], counts["test"]] == pytest.approx(crossval.fold_shares(5))


def test_recipes_are_compared_image_by_image_only_on_the_same_folds() -> None:
    def result(right: list[int], paths: list[str]) -> dict:
        return {"folds": [{"test_paths": paths, "test_right": right}]}

    paths = [f"{i}.png" for i in range(10)]
    better, worse = result([1] * 9 + [0], paths), result([1] * 5 + [0] * 5, paths)
    comparison = crossval.compare_recipes(better, worse)
    assert comparison["difference"] == pytest.approx(0.4)
    assert (comparison["first_only_right"], comparison["second_only_right"]) == (4, 0)
    assert comparison["mcnemar_p_value"] == pytest.approx(0.125)             # 2 * 0.5**4
    with pytest.raises(PipelineError, match="not tested on the same folds"):
        crossval.compare_recipes(better, result([1] * 10, [f"other{i}.png" for i in range(10)]))
    # The same images dealt into other folds (another seed or --folds): not a paired comparison either.
    dealt_otherwise = {"folds": [{"test_paths": paths[5:], "test_right": [1] * 5},
                                 {"test_paths": paths[:5], "test_right": [1] * 5}]}
    same_deal = {"folds": [{"test_paths": paths[:5], "test_right": [1] * 5},
                           {"test_paths": paths[5:], "test_right": [0] * 5}]}
    assert crossval.compare_recipes(same_deal, same_deal)["difference"] == 0
    with pytest.raises(PipelineError, match="seed or --folds"):
        crossval.compare_recipes(same_deal, dealt_otherwise)


def test_the_report_marks_a_recipe_of_other_folds_and_says_what_mcnemar_compares() -> None:
    """A results file can hold a run on another folder or seed: its row says so, the others are
    still compared and printed. The comparison counts right and wrong answers, so under another
    gate metric its difference is in accuracy, and says so."""
    results = json.loads((REPO_ROOT / "bench" / "crossval-catsdogs-small.json").read_text())["recipes"]
    reference, other = "preset (baseline)", "+ EMA of the weights"
    elsewhere = {**results[other],
                 "folds": [{**fold, "test_paths": [f"elsewhere/{path}" for path in fold["test_paths"]]}
                           for fold in results[other]["folds"]]}
    lines = crossval.report_lines({reference: results[reference], other: results[other], "elsewhere": elsewhere},
                                  reference)
    row = {line.split("  ")[0]: line for line in lines[1:] if not line.startswith(" ")}
    assert "pts, p=" in row[other]
    assert row["elsewhere"].endswith("other folds (folder, seed or --folds): not compared")
    unbalanced = json.loads((REPO_ROOT / "bench" / "crossval-unbalanced.json").read_text())["recipes"]
    first = next(iter(unbalanced))
    compared = [line for line in crossval.report_lines(unbalanced, first)[1:] if not line.startswith(first)]
    assert compared and all("balanced_accuracy" in line and "pts of accuracy, p=" in line for line in compared
                            if "pts" in line)


def test_an_unknown_reference_is_refused_before_anything_trains(tmp_path: Path, trained: list[Path]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    assert _run([*argv, "--name", "tiny"]) == 0
    folds, before = len(trained), out.read_bytes()
    assert _run([*argv, "--name", "other", "--against", "tinny"]) == EXIT_USER_ERROR
    assert len(trained) == folds and out.read_bytes() == before
    assert _run([*argv, "--name", "other", "--against", "tiny", "--set", "train_custom.epochs=2"]) == 0


def test_a_broken_params_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("base:\n  seed: [1\n")
    with pytest.raises(PipelineError, match="not valid YAML at line 3"):
        crossval.recipe_params(tmp_path / "params.yaml", [], [])
    with pytest.raises(PipelineError, match="no such params file"):
        crossval.recipe_params(tmp_path / "absent.yaml", [], [])


def test_repetitions_are_compared_fold_by_fold_with_the_corrected_t_test() -> None:
    def result(scores: list[float], deals: list[list[str]]) -> dict:
        return {"folds": [{"test_paths": deal, "test_score": score, "sizes": {"train": 7, "validation": 1, "test": 2}}
                          for deal, score in zip(deals, scores)]}

    seed0, seed1 = [["a", "b"], ["c", "d"]], [["a", "c"], ["b", "d"]]
    pairs = [(result([0.8, 0.9], seed0), result([0.7, 0.85], seed0)),
             (result([0.75, 0.8], seed1), result([0.75, 0.7], seed1))]
    comparison = crossval.compare_repeated(pairs)
    assert (comparison["folds"], comparison["repetitions"]) == (4, 2)
    assert comparison["difference"] == pytest.approx((0.1 + 0.05 + 0.0 + 0.1) / 4)
    # Folds that share training photos: the test's variance grows by test/train = 2/8.
    assert comparison["p_value"] == pytest.approx(statistics.repeated_cv_p_value([0.1, 0.05, 0.0, 0.1], 0.25))
    with pytest.raises(PipelineError, match="seed or --folds"):
        crossval.compare_repeated([(result([0.8, 0.9], seed0), result([0.7, 0.85], seed1))])


def _tiny_crossval(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A folder of 20 small images in two colours, params for a seconds-long fold, and crossval's
    arguments for two folds of it: the folder, the results file and the arguments."""
    folder = make_image_folder(tmp_path / "images", {"red": 10, "green": 10}, size=16)
    params = project_params()
    params["base"].update(image_size=32, channels=3)
    params["train_custom"].update(epochs=1, blocks=[4], dense_units=[8])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "cv.json"
    return folder, out, ["--params", str(tmp_path / "params.yaml"), "--source", str(folder), "--folds", "2",
                         "--out", str(out)]


@pytest.mark.slow
def test_a_real_cross_validation_on_a_tiny_folder_writes_every_fold(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--name", "tiny"]) == 0
    recipe = json.loads(out.read_text())["recipes"]["tiny"]
    assert recipe["images"] == 20 and len(recipe["folds"]) == 2
    # 4 filters leave a CPU's fast bfloat16 path: said once for the command, not once per fold.
    in_bfloat16 = recipe["folds"][0]["precision"] == "mixed_bfloat16"
    assert capsys.readouterr().err.count("train_custom.blocks: 4 filters are not a multiple of 16") == in_bfloat16
    # Every setting the folds trained with is kept, whatever the params or a preset say later.
    assert recipe["params"]["base.image_size"] == 32 and recipe["params"]["train_custom.blocks"] == [4]
    assert "augment.rand_augment" in recipe["params"] and "ingest.source" not in recipe["params"]
    # The precision the folds trained in (mixed bfloat16 where the CPU has it) does not outlive them.
    assert keras.mixed_precision.global_policy().name == "float32"
    tested = sorted(path for fold in recipe["folds"] for path in fold["test_paths"])
    assert tested == sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*.*"))
    for fold in recipe["folds"]:
        assert fold["sizes"]["test"] == 10 and fold["epochs_run"] == 1
        assert np.mean(fold["test_right"]) == pytest.approx(fold["test_accuracy"])
        assert fold["test_score"] == fold["test_accuracy"]                  # gate.metric: accuracy
        assert np.mean(np.equal(fold["test_label"], fold["test_predicted"])) == pytest.approx(fold["test_accuracy"])
        assert 0 <= fold["test_accuracy_flip"] <= 1 and 0 <= fold["train_accuracy"] <= 1
    # Once chosen, the recipe is trained on the whole folder and scored once on a folder kept apart.
    holdout = make_image_folder(tmp_path / "kept_apart", {"red": 3, "green": 3}, size=16, seed=9)
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--name", "tiny", "--holdout", str(holdout)]) == 0
    held = json.loads(out.read_text())["recipes"]["tiny"]["holdout"]
    assert held["sizes"] == {"train": 15, "validation": 5, "test": 6}   # a quarter stops early and len(held["test_right"]) == 6
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--name", "unknown", "--holdout", str(holdout)]) == EXIT_USER_ERROR
    # The table is printed again from the file without training, and without the folder (a results
    # file can travel without its photos); a misspelt key fails in one line, writing nothing.
    capsys.readouterr()
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--name", "tiny", "--report-only", "--against", "tiny",
                                   "--source", str(tmp_path / "gone")]) == 0
    assert "-S gate.min_train_score=" in capsys.readouterr().err     # the thresholds its worst fold suggests
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--report-only", "--out", str(tmp_path / "none.json")]) == EXIT_USER_ERROR
    assert "--report-only: no results file" in capsys.readouterr().err
    before = out.read_bytes()
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--set", "train_custom.dropot=0.5"]) == EXIT_USER_ERROR
    assert out.read_bytes() == before


@pytest.mark.slow
def test_a_stopped_cross_validation_keeps_its_folds_and_the_same_command_goes_on(tmp_path: Path, monkeypatch) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    argv = [*argv, "--name", "tiny"]
    real_run_fold, trained = crossval.run_fold, []

    def stopped_in_the_second_fold(*args, **kwargs):
        trained.append(args)
        if len(trained) == 2:
            raise KeyboardInterrupt   # as Ctrl-C (or a machine going down) during the second fold
        return real_run_fold(*args, **kwargs)

    monkeypatch.setattr(crossval, "run_fold", stopped_in_the_second_fold)
    with pytest.raises(KeyboardInterrupt):
        crossval.main(crossval.build_parser().parse_args(argv))
    stopped = json.loads(out.read_text())["recipes"]["tiny"]
    assert [fold["fold"] for fold in stopped["folds"]] == [1] and stopped["folds_planned"] == 2
    assert crossval.stopped_early(stopped)

    # A different recipe under the stopped one's name is refused, and the file is left as it was.
    before = out.read_bytes()
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--set", "train_custom.epochs=2"]) == EXIT_USER_ERROR
    assert out.read_bytes() == before
    # Nor is the same command once the params it resolves to have changed (a preset edited since):
    # the message names the key.
    results = json.loads(before)
    results["recipes"]["tiny"]["params"]["train_custom.dropout"] = 0.25
    out.write_text(json.dumps(results))
    before = out.read_bytes()
    with pytest.raises(PipelineError, match=r"other settings \(train_custom.dropout differs\)"):
        crossval.main(crossval.build_parser().parse_args(argv))
    assert out.read_bytes() == before
    results["recipes"]["tiny"]["params"]["train_custom.dropout"] = stopped["params"]["train_custom.dropout"]
    out.write_text(json.dumps(results))
    # Nor is a stopped recipe scored on a held-out folder: it has not been cross-validated.
    holdout = make_image_folder(tmp_path / "kept_apart", {"red": 3, "green": 3}, size=16, seed=9)
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(),
                                  [*argv, "--holdout", str(holdout)]) == EXIT_USER_ERROR

    # The same command again trains the second fold only and keeps the first as it was.
    trained.clear()
    monkeypatch.setattr(crossval, "run_fold", lambda *args, **kwargs: trained.append(args) or real_run_fold(*args,
                                                                                                          **kwargs))
    assert crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(), argv) == 0
    finished = json.loads(out.read_text())["recipes"]["tiny"]
    assert len(trained) == 1
    assert [fold["fold"] for fold in finished["folds"]] == [1, 2] and not crossval.stopped_early(finished)
    assert finished["folds"][0] == stopped["folds"][0] and finished["started"] == stopped["started"]
    tested = sorted(path for fold in finished["folds"] for path in fold["test_paths"])
    assert tested == sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*.*"))


def _instant_fold(params, model_name: str, root: Path, frame: pd.DataFrame, holdout=None) -> dict:
    """``run_fold``'s outcome without training: every test image answered right, in no time."""
    tested = holdout.subset("test") if holdout is not None else frame[frame["split"] == "test"]
    count = len(tested)
    answers = {f"{split}_{kind}{flip}": 1.0 for split in ("test", "train") for kind in ("accuracy", "score")
               for flip in ("", "_flip")}
    answers.update({f"test_{kind}{flip}": [1 if kind == "right" else 0] * count for kind in ("right", "predicted")
                    for flip in ("", "_flip")})
    sizes = {split: int((frame["split"] == split).sum()) for split in ("train", "validation")}
    return {**answers, "test_label": [0] * count, "sizes": {**sizes, "test": count}, "epochs_run": 1, "fit_s": 0.0,
            "test_paths": tested["path"].tolist(), "precision": "float32"}


def _run(argv: list[str]) -> int:
    return crossval.cli.run_stage("crossval", crossval.main, crossval.build_parser(), argv)


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Folds answered by :func:`_instant_fold`; the list holds the folder of each fold trained."""
    folds: list[Path] = []
    monkeypatch.setattr(crossval, "run_fold", lambda params, model, root, *rest, **kwargs:
                        folds.append(root) or _instant_fold(params, model, root, *rest, **kwargs))
    monkeypatch.setattr("pipeline.devices.machine_summary", lambda: {"cpu": "test", "cpu_cores": 1})
    return folds


def test_going_on_is_refused_when_the_folder_changed_since_the_stopped_run(
        tmp_path: Path, trained: list[Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    instant = crossval.run_fold

    def stopped_in_the_second_fold(*args, **kwargs):
        if len(trained) == 1:
            raise KeyboardInterrupt
        return instant(*args, **kwargs)

    monkeypatch.setattr(crossval, "run_fold", stopped_in_the_second_fold)
    with pytest.raises(KeyboardInterrupt):
        crossval.main(crossval.build_parser().parse_args([*argv, "--name", "tiny"]))
    monkeypatch.setattr(crossval, "run_fold", instant)
    stopped = json.loads(out.read_text())["recipes"]["tiny"]
    (folder / stopped["folds"][0]["test_paths"][0]).unlink()      # an image the kept fold tested is gone
    before = out.read_bytes()
    assert _run([*argv, "--name", "tiny"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "changed since the stopped run: its fold 1 tested other images" in error and "a new --name or --out" in error
    assert out.read_bytes() == before and len(trained) == 1


def test_the_holdout_scores_only_the_recipe_with_its_own_settings(tmp_path: Path, trained: list[Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    assert _run([*argv, "--name", "tiny"]) == 0
    holdout = make_image_folder(tmp_path / "kept_apart", {"red": 3, "green": 3}, size=16, seed=9)
    before = out.read_bytes()
    assert _run([*argv, "--name", "tiny", "--holdout", str(holdout), "--set", "train_custom.epochs=2"]) == \
        EXIT_USER_ERROR
    assert "with other settings (overrides, train_custom.epochs differ)" in capsys.readouterr().err
    assert _run([*argv, "--name", "tiny", "--holdout", str(holdout), "--folds", "3"]) == EXIT_USER_ERROR
    assert "(folds_planned differs)" in capsys.readouterr().err
    assert out.read_bytes() == before and len(trained) == 2
    assert _run([*argv, "--name", "tiny", "--holdout", str(holdout)]) == 0
    assert json.loads(out.read_text())["recipes"]["tiny"]["holdout"]["sizes"]["test"] == 6
    # Once: a second score would overwrite the first and let the kept-apart folder choose.
    scored, trained_before = out.read_bytes(), len(trained)
    assert _run([*argv, "--name", "tiny", "--holdout", str(holdout)]) == EXIT_USER_ERROR
    assert "scored on its held-out folder" in capsys.readouterr().err
    assert out.read_bytes() == scored and len(trained) == trained_before


def test_a_finished_recipe_is_kept_and_other_settings_under_its_name_are_refused(
        tmp_path: Path, trained: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    assert _run([*argv, "--name", "tiny"]) == 0
    holdout = make_image_folder(tmp_path / "kept_apart", {"red": 3, "green": 3}, size=16, seed=9)
    assert _run([*argv, "--name", "tiny", "--holdout", str(holdout)]) == 0
    before, trained_before = out.read_bytes(), len(trained)
    # The same command again trains nothing and keeps the recipe, its held-out score included.
    assert _run([*argv, "--name", "tiny"]) == 0
    assert out.read_bytes() == before and len(trained) == trained_before
    assert "nothing to train" in capsys.readouterr().err
    assert _run([*argv, "--name", "tiny", "--set", "train_custom.epochs=2"]) == EXIT_USER_ERROR
    assert (f"recipe 'tiny' in {out} was cross-validated (every fold) with other settings "
            "(overrides, train_custom.epochs differ); give this one another --name" in capsys.readouterr().err)
    assert out.read_bytes() == before and len(trained) == trained_before


def test_runs_that_differ_get_different_names_by_default() -> None:
    names = {crossval.default_name([], "custom", {}), crossval.default_name(["photos"], "custom", {}),
             crossval.default_name([], "resnet50", {}), crossval.default_name(["photos", "unbalanced"], "custom", {}),
             crossval.default_name([], "custom", {"train_custom.epochs": 2})}
    assert names == {"params.yaml", "preset=photos", "model=resnet50", "preset=photos+unbalanced",
                     "train_custom.epochs=2"}
    assert crossval.default_name(["photos"], "resnet50", {"augment.mixup": 0.2}) == \
        "preset=photos,model=resnet50,augment.mixup=0.2"


def test_a_results_file_written_before_every_setting_was_kept_matches_its_own_command() -> None:
    """Older entries name their preset as a string and lack the planned folds: the same settings all the same."""
    recipe = json.loads((REPO_ROOT / "bench" / "crossval-catsdogs-small.json").read_text())["recipes"][
        "preset (baseline)"]
    assert isinstance(recipe["preset"], str) and "folds_planned" not in recipe and "params" not in recipe
    settings = {"preset": ["photos"], "overrides": {}, "model": "custom", "source": recipe["source"],
                "metric": "accuracy", "folds_planned": 5, "params": {}}
    assert crossval.differing_settings(recipe, settings) == []
    assert crossval.differing_settings(recipe, {**settings, "model": "resnet50", "folds_planned": 3}) == \
        ["model", "folds_planned"]


def test_two_runs_on_one_results_file_keep_each_others_recipes(tmp_path: Path, trained: list[Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    instant = crossval.run_fold
    one_fold = pd.DataFrame({"path": [f"red/red_00{i}.png" for i in range(4)], "split": "test"})
    other = {"folds": [{"fold": 1, **_instant_fold(None, "custom", folder, one_fold)}], "folds_planned": 2}

    def another_run_writes_meanwhile(*args, **kwargs):
        if len(trained) == 0:    # the other run finishes a fold after this one has read the file
            crossval.update_recipe(out, "other", lambda _: other)
        return instant(*args, **kwargs)

    monkeypatch.setattr(crossval, "run_fold", another_run_writes_meanwhile)
    assert crossval.main(crossval.build_parser().parse_args([*argv, "--name", "tiny"])) is None
    recipes = json.loads(out.read_text())["recipes"]
    assert recipes["other"] == other and len(recipes["tiny"]["folds"]) == 2


def test_a_results_file_is_written_under_an_exclusive_lock(tmp_path: Path) -> None:
    import fcntl
    import threading

    out = tmp_path / "cv.json"
    with open(tmp_path / ".cv.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # another run is writing
        writer = threading.Thread(target=crossval.update_recipe, args=(out, "tiny", lambda _: {"folds": []}))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not out.exists()      # it waits its turn
        fcntl.flock(lock, fcntl.LOCK_UN)
    writer.join(timeout=5)
    assert not writer.is_alive() and json.loads(out.read_text()) == {"recipes": {"tiny": {"folds": []}}}


def test_crossval_ingests_the_folder_as_the_ingest_stage_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same arguments to ``ingest_folder`` (the SSIM confirmation of near copies included): the same groups."""
    import argparse

    from pipeline import ingest

    folder = make_image_folder(tmp_path / "images", {"red": 4, "green": 4}, size=16)
    raw = project_params()
    raw["ingest"]["source"] = str(folder)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    calls = []
    real = ingest.ingest_folder
    monkeypatch.setattr(ingest, "ingest_folder", lambda *args, **kwargs: calls.append((args, kwargs)) or real(*args,
                                                                                                             **kwargs))
    ingest.main(argparse.Namespace(params=str(tmp_path / "params.yaml"), out=str(tmp_path / "ingest"),
                                   metrics=str(tmp_path / "ingest.json"), verbose=False))
    params, _ = crossval.recipe_params(tmp_path / "params.yaml", [], [])
    crossval.ingested(params, folder)
    (stage_args, stage_kwargs), (crossval_args, crossval_kwargs) = calls
    assert stage_kwargs["near_duplicate_similarity"] == raw["ingest"]["near_duplicate_similarity"]
    assert (crossval_args, crossval_kwargs) == (stage_args, stage_kwargs)


@pytest.mark.parametrize(("per_class", "group_size", "folds", "message"), [
    ({"cat": 12, "dog": 30}, 4, 5, "class 'cat' has 12 images in only 3 groups of copies; use fewer folds or more "
                                   "distinct images of 'cat'"),
    ({"cat": 12, "dog": 12}, 6, 5, "class 'cat' has 12 images in only 2 groups"),    # sklearn: a ValueError
    ({"cat": 30, "dog": 6}, 1, 5, "smallest class has 6 images; use fewer folds or more images of 'dog'"),
])
def test_a_class_with_too_few_groups_of_copies_for_the_folds_is_one_clear_error(per_class, group_size, folds,
                                                                                 message) -> None:
    with pytest.raises(PipelineError, match=message):
        crossval.assign_folds(_manifest(per_class, group_size=group_size), folds=folds, seed=0)


def test_a_folder_the_ingest_stage_refuses_is_refused(tmp_path: Path, trained: list[Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    (folder / "blue").mkdir()                          # a class folder without images
    assert _run(argv) == EXIT_USER_ERROR
    assert f"class folder {folder / 'blue'} has no usable image" in capsys.readouterr().err
    one = make_image_folder(tmp_path / "one", {"red": 10}, size=16)
    assert _run([*argv, "--source", str(one)]) == EXIT_USER_ERROR
    assert "only one class (red) has usable images" in capsys.readouterr().err
    assert not out.exists() and trained == []


def test_a_value_that_is_not_yaml_and_a_file_that_is_not_results_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PipelineError, match=r"--set 'augment.rotation=\[0.1': the value is not YAML \(expected ',' "
                                            r"or '\]', but got '<stream end>'\)"):
        crossval.recipe_params(REPO_ROOT / "params.yaml", [], ["augment.rotation=[0.1"])
    folder, out, argv = _tiny_crossval(tmp_path)
    out.write_text('{"recipes": {"tiny": {')
    assert _run([*argv, "--report-only"]) == EXIT_USER_ERROR
    assert f"crossval: {out} is not a crossval results file (not JSON: Expecting property name" in \
        capsys.readouterr().err
    out.write_text('{"folds": []}')
    assert _run([*argv, "--report-only"]) == EXIT_USER_ERROR
    assert f'crossval: {out} is not a crossval results file (no "recipes" in it); give --out another file' in \
        capsys.readouterr().err


def test_report_only_trains_nothing_whatever_else_is_given(tmp_path: Path, trained: list[Path]) -> None:
    folder, out, argv = _tiny_crossval(tmp_path)
    assert _run([*argv, "--name", "tiny"]) == 0
    holdout = make_image_folder(tmp_path / "kept_apart", {"red": 3, "green": 3}, size=16, seed=9)
    before, folds = out.read_bytes(), len(trained)
    assert _run([*argv, "--name", "tiny", "--report-only", "--holdout", str(holdout)]) == 0
    assert out.read_bytes() == before and len(trained) == folds


def test_the_printed_command_names_a_model_other_than_the_default() -> None:
    from docs.crossval_table import command_of

    recipe = {"source": "photos", "preset": ["photos"], "overrides": {}, "folds_planned": 5, "folds": [],
              "model": "resnet50"}
    assert command_of("r", recipe, "cv.json") == ("python -m pipeline.crossval --source photos --preset photos "
                                                  "--model resnet50 --folds 5 --name r --out cv.json")
    assert "--model" not in command_of("c", {**recipe, "model": "custom"}, "cv.json")
