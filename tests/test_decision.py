"""The gate's decision without MLflow or files: the deck's flowchart (underfit / overfit / deploy),
the choice of model, the challenger against the champion's answers, the summary. The registry is in
tests/test_gate_registry.py, the CI check and deploy/ in tests/test_gate.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipeline.artifacts import SplitPredictions
from pipeline.decision import (
    DEPLOY,
    MISCALIBRATED,
    NO_CHAMPION,
    NOT_COMPARABLE,
    OVERFIT,
    REPLACED,
    RESTORED,
    SAME_MODEL,
    STAYS,
    UNDERFIT,
    UNKNOWN,
    CalibrationNote,
    ChampionCheck,
    Decision,
    Estimate,
    SplitReuse,
    above,
    at_least,
    best_passing,
    cannot_score,
    challenge,
    compare_models,
    decide,
    judge,
    judge_all,
    not_comparable,
    restored,
    split_fingerprint,
    summary_lines,
)
from pipeline.params import GateParams

GATE = GateParams(metric="accuracy", min_train_score=0.9, min_test_score=0.85, max_regression=0.0, confidence=None,
                  registered_model_name="image-classifier")
FIRST_RUN = ChampionCheck(NO_CHAMPION, reasons=["no image-classifier@champion in the registry yet"])


def answers(right: int, total: int, labels: tuple[str, ...] = ("cat", "dog")) -> SplitPredictions:
    """``total`` images in turn of each label, the first ``right`` answered right, the rest wrong."""
    actual = [labels[i % len(labels)] for i in range(total)]
    predicted = [label if i < right else labels[(labels.index(label) + 1) % len(labels)]
                 for i, label in enumerate(actual)]
    return SplitPredictions(tuple(f"{label}/{i:04d}.png" for i, label in enumerate(actual)), tuple(actual),
                            tuple(predicted))


def model(train: float, test: float, total: int = 200, validation: float | None = None) -> dict[str, SplitPredictions]:
    """One model's answers: train, validation (the test accuracy unless given) and test accuracy as
    given (on ``total`` images each)."""
    validation = test if validation is None else validation
    return {"train": answers(round(train * total), total), "validation": answers(round(validation * total), total),
            "test": answers(round(test * total), total)}


def verdicts(gate: GateParams = GATE, **models: tuple[float, float]) -> dict:
    return judge_all({name: model(*scores) for name, scores in models.items()}, gate, seed=0)


def decision_of(gate: GateParams = GATE, champion: ChampionCheck = FIRST_RUN, **models: tuple[float, float]) -> Decision:
    predictions = {name: model(*scores) for name, scores in models.items()}
    return decide(judge_all(predictions, gate, 0), compare_models(predictions, gate, 0), champion, gate)


# --- judge ---------------------------------------------------------------------------------------

def test_judge_underfit_when_train_below_threshold() -> None:
    verdict = judge(Estimate(0.5), Estimate(0.99), GATE)
    assert verdict.verdict == UNDERFIT == "underfit"
    assert (verdict.train.score, verdict.test.score) == (0.5, 0.99)
    assert len(verdict.reasons) == 1
    assert "train accuracy 0.5000 < min_train_score 0.9" in verdict.reasons[0]


def test_judge_overfit_when_train_passes_and_test_fails() -> None:
    verdict = judge(Estimate(0.99), Estimate(0.6), GATE)
    assert verdict.verdict == OVERFIT == "overfit"
    assert len(verdict.reasons) == 2
    assert "train accuracy 0.9900 >= min_train_score 0.9" in verdict.reasons[0]
    assert "test accuracy 0.6000 < min_test_score 0.85" in verdict.reasons[1]


def test_judge_deploy_when_both_pass() -> None:
    verdict = judge(Estimate(0.95), Estimate(0.9), GATE)
    assert verdict.verdict == DEPLOY == "deploy"
    assert verdict.reasons == ["train accuracy 0.9500 >= min_train_score 0.9",
                               "test accuracy 0.9000 >= min_test_score 0.85"]


def test_judge_thresholds_are_inclusive() -> None:
    assert judge(Estimate(0.9), Estimate(0.85), GATE).verdict == DEPLOY
    assert judge(Estimate(0.8999), Estimate(0.85), GATE).verdict == UNDERFIT
    assert judge(Estimate(0.9), Estimate(0.8499), GATE).verdict == OVERFIT


def test_judge_checks_train_first() -> None:
    # Both below: the flowchart stops at the first question.
    assert judge(Estimate(0.1), Estimate(0.1), GATE).verdict == UNDERFIT


@pytest.mark.parametrize(("train", "test"), [(0.0, 0.0), (0.2, 1.0), (1.0, 0.0)])
def test_judge_with_zero_thresholds_always_deploys(train: float, test: float) -> None:
    gate = replace(GATE, min_train_score=0.0, min_test_score=0.0)
    assert judge(Estimate(train), Estimate(test), gate).verdict == DEPLOY


def test_at_a_confidence_the_lower_end_of_the_interval_must_clear_the_threshold() -> None:
    confident = replace(GATE, confidence=0.95)
    # 0.90 on 200 test images: the Wilson interval reaches down to about 0.85.
    assert verdicts(GATE, custom=(0.95, 0.87))["custom"].verdict == DEPLOY
    judged = verdicts(confident, custom=(0.95, 0.87))["custom"]
    assert judged.verdict == OVERFIT
    assert judged.test.interval.low < 0.85 < judged.test.score
    assert "95% interval" in judged.reasons[1] and "lower end < min_test_score 0.85" in judged.reasons[1]
    # Clear margins pass at a confidence too; the train score is judged by its interval as well.
    assert verdicts(confident, custom=(0.99, 0.95))["custom"].verdict == DEPLOY
    assert verdicts(confident, custom=(0.91, 0.95))["custom"].verdict == UNDERFIT


def test_at_a_confidence_no_interval_means_no_pass() -> None:
    confident = replace(GATE, confidence=0.9)
    verdict = judge(Estimate(1.0, None), Estimate(1.0, None), confident)
    assert verdict.verdict == UNDERFIT
    assert "no 90% interval (too few images)" in verdict.reasons[0]


def test_the_gated_metric_can_be_balanced_accuracy() -> None:
    # 90 cats all right, 10 dogs all wrong: accuracy 0.90 flatters a model that ignores the dogs.
    lopsided = SplitPredictions(tuple(str(i) for i in range(100)), ("cat",) * 90 + ("dog",) * 10, ("cat",) * 100)
    predictions = {"custom": {"train": lopsided, "test": lopsided, "validation": lopsided}}
    gate = replace(GATE, min_train_score=0.8, min_test_score=0.8)
    assert judge_all(predictions, gate, 0)["custom"].verdict == DEPLOY
    balanced = judge_all(predictions, replace(gate, metric="balanced_accuracy"), 0)["custom"]
    assert balanced.verdict == UNDERFIT and balanced.train.score == pytest.approx(0.5)
    assert "train balanced_accuracy 0.5000 < min_train_score 0.8" in balanced.reasons[0]


# --- the choice among the candidates -------------------------------------------------------------

def test_the_best_test_score_among_passing_models_is_the_challenger() -> None:
    decision = decision_of(custom=(0.95, 0.88), resnet50=(0.99, 0.93))
    assert decision.deploy is True and decision.model == "resnet50"
    assert {name: v.verdict for name, v in decision.candidates.items()} == {"custom": DEPLOY, "resnet50": DEPLOY}


def test_a_better_test_score_from_a_failing_model_is_ignored() -> None:
    decision = decision_of(custom=(0.95, 0.86), resnet50=(0.5, 0.97))
    assert decision.model == "custom"
    assert decision.candidates["resnet50"].verdict == UNDERFIT


def test_the_better_validation_score_goes_forward_not_the_better_test_score() -> None:
    """Choosing on the test set, then judging on it, would favour the luckiest model on those images."""
    predictions = {"custom": model(0.95, 0.90, validation=0.93), "resnet50": model(0.99, 0.92, validation=0.88)}
    candidates = judge_all(predictions, GATE, 0)
    assert candidates["custom"].validation.score == pytest.approx(0.93)
    assert best_passing(candidates) == "custom"
    decision = decide(candidates, compare_models(predictions, GATE, 0), FIRST_RUN, GATE)
    assert decision.model == "custom" and decision.to_json()["candidates"]["custom"]["validation_score"] == 0.93
    assert "custom       0.9500      0.9300" in "\n".join(summary_lines(decision))


def test_without_a_validation_split_the_test_score_chooses() -> None:
    predictions = {name: {split: answers for split, answers in model(0.99, test).items() if split != "validation"}
                   for name, test in (("custom", 0.90), ("resnet50", 0.92))}
    assert best_passing(judge_all(predictions, GATE, 0)) == "resnet50"


def test_a_tie_goes_to_the_first_model() -> None:
    assert best_passing(verdicts(custom=(0.95, 0.9), resnet50=(0.99, 0.9))) == "custom"
    # A tie in a metric that averages over classes can differ in the last bits: (0.1 + 0.1 + 1.0) / 3
    # against (1.0 + 0.1 + 0.1) / 3 is 0.39999999999999997 against 0.4000000000000001.
    candidates = verdicts(custom=(0.95, 0.9), resnet50=(0.99, 0.9))
    noisy = {"custom": replace(candidates["custom"], validation=Estimate((0.1 + 0.1 + 1.0) / 3)),
             "resnet50": replace(candidates["resnet50"], validation=Estimate((1.0 + 0.1 + 0.1) / 3))}
    assert noisy["custom"].validation.score < noisy["resnet50"].validation.score
    assert best_passing(noisy) == "custom"
    ahead = {**noisy, "resnet50": replace(candidates["resnet50"], validation=Estimate(0.41))}
    assert best_passing(ahead) == "resnet50"


def test_nothing_deploys_when_no_model_passes() -> None:
    decision = decision_of(custom=(0.5, 0.5), resnet50=(0.99, 0.5))
    assert decision.deploy is False and decision.model is None
    assert decision.candidates["custom"].verdict == UNDERFIT
    assert decision.candidates["resnet50"].verdict == OVERFIT
    assert summary_lines(decision)[-1] == "deployed: nothing (no model passed both thresholds)"


def test_compare_only_decides_the_same_but_promotes_nothing() -> None:
    import dataclasses

    promoting = decision_of(custom=(0.95, 0.9))
    compare_only = decision_of(dataclasses.replace(GATE, promote=False), custom=(0.95, 0.9))
    assert promoting.deploy is compare_only.deploy is True and promoting.model == compare_only.model == "custom"
    assert promoting.promoted is True and compare_only.promoted is False
    assert summary_lines(compare_only)[-1] == ("deployed: nothing, compare only (gate.promote: false): custom would be "
                                               "promoted (nothing registered, deploy/ unchanged)")
    refused = decision_of(dataclasses.replace(GATE, promote=False), custom=(0.5, 0.5))
    assert refused.promoted is False and summary_lines(refused)[-1].startswith("deployed: nothing (no model passed")


def test_the_two_models_are_compared_on_the_same_test_images() -> None:
    decision = decision_of(custom=(0.95, 0.90), resnet50=(0.99, 0.95))
    (comparison,) = decision.comparisons
    assert (comparison.first, comparison.second) == ("custom", "resnet50")
    assert comparison.difference == pytest.approx(-0.05)
    # answers() makes the better model right on every image the worse one is right on.
    assert (comparison.first_only_right, comparison.second_only_right) == (0, 10)
    assert comparison.mcnemar_p_value == pytest.approx(2 / 1024)
    assert "compared: custom 0.900 vs resnet50 0.950: -5.0 points" in "\n".join(summary_lines(decision))


# --- calibration ---------------------------------------------------------------------------------

NOTES = {"custom": CalibrationNote(0.12, 0.09, 1.0, "metrics/plots/gradcam_custom.png"),
         "resnet50": CalibrationNote(0.03, 0.07, 1.8, "metrics/plots/gradcam_resnet50.png")}


def test_calibration_decides_nothing_unless_max_calibration_error_is_set() -> None:
    predictions = {"custom": model(0.99, 0.95, validation=0.97), "resnet50": model(0.99, 0.95)}
    decision = decide(judge_all(predictions, GATE, 0, NOTES), compare_models(predictions, GATE, 0), FIRST_RUN, GATE)
    assert {name: verdict.verdict for name, verdict in decision.candidates.items()} == {"custom": DEPLOY,
                                                                                      "resnet50": DEPLOY}
    assert decision.model == "custom" and "max_calibration_error" not in decision.thresholds
    # The summary says each model's calibration and where its surest mistakes are pictured, one line each.
    lines = summary_lines(decision)
    assert ("calibration: custom test ECE 0.1200, Brier 0.0900 (no temperature scaling); surest mistakes "
            "pictured in metrics/plots/gradcam_custom.png") in lines
    assert ("calibration: resnet50 test ECE 0.0300, Brier 0.0700 (temperature 1.80); surest mistakes "
            "pictured in metrics/plots/gradcam_resnet50.png") in lines
    assert decision.to_json()["candidates"]["custom"]["calibration"]["ece"] == 0.12


def test_with_max_calibration_error_a_model_above_it_does_not_deploy() -> None:
    strict = replace(GATE, max_calibration_error=0.05)
    predictions = {"custom": model(0.99, 0.95, validation=0.97), "resnet50": model(0.99, 0.95)}
    decision = decide(judge_all(predictions, strict, 0, NOTES), compare_models(predictions, strict, 0), FIRST_RUN,
                      strict)
    custom, resnet50 = decision.candidates["custom"], decision.candidates["resnet50"]
    assert custom.verdict == MISCALIBRATED and resnet50.verdict == DEPLOY
    assert "test ECE 0.1200 > max_calibration_error 0.05" in custom.reasons[-1]
    assert resnet50.reasons[-1] == "test ECE 0.0300 <= max_calibration_error 0.05"
    assert decision.model == "resnet50" and decision.thresholds["max_calibration_error"] == 0.05
    # Exactly at the bound passes; a model with no figures (an old report) fails closed.
    at_bound = {**NOTES, "custom": replace(NOTES["custom"], ece=0.05)}
    assert judge_all(predictions, strict, 0, at_bound)["custom"].verdict == DEPLOY
    unmeasured = judge_all(predictions, strict, 0, {})
    assert {verdict.verdict for verdict in unmeasured.values()} == {MISCALIBRATED}
    assert "no calibration figures" in unmeasured["custom"].reasons[-1]
    nothing = decide(unmeasured, compare_models(predictions, strict, 0), FIRST_RUN, strict)
    assert summary_lines(nothing)[-1] == ("deployed: nothing (no model passed both thresholds and "
                                          "max_calibration_error)")
    # An underfit model stays underfit: calibration is judged on the models that pass the thresholds.
    assert judge_all({"custom": model(0.5, 0.5)}, strict, 0, NOTES)["custom"].verdict == UNDERFIT


def test_predictions_for_different_images_are_refused() -> None:
    from pipeline.errors import PipelineError

    predictions = {"custom": model(0.9, 0.9), "resnet50": model(0.9, 0.9, total=100)}
    with pytest.raises(PipelineError, match="different images: rerun the evaluate stage"):
        compare_models(predictions, GATE, 0)


# --- the challenger against the champion ---------------------------------------------------------

def champion_answers(right: int, total: int = 200, first_right: int = 0) -> list[str]:
    """The champion's answers for :func:`answers`' images: right on ``right`` images from ``first_right`` on."""
    actual = answers(total, total).actual
    wrong = answers(0, total).predicted
    return [actual[i] if first_right <= i < first_right + right else wrong[i] for i in range(total)]


def test_a_worse_challenger_leaves_the_champion_in_place() -> None:
    result = challenge("custom", answers(180, 200), "3", "resnet50", champion_answers(190), GATE, seed=0)
    assert result.outcome == STAYS and not result.challenger_deploys
    assert result.comparison.difference == pytest.approx(-0.05)
    assert result.comparison.second == "champion v3"
    (reason,) = result.reasons
    assert reason.startswith("challenger custom 0.900 vs champion v3 0.950: -5.0 points")
    assert "McNemar p = " in reason and reason.endswith("needs at least as good: champion v3 stays")


def test_an_equal_or_better_challenger_replaces_the_champion() -> None:
    assert challenge("custom", answers(190, 200), "3", "custom", champion_answers(180), GATE, 0).outcome == REPLACED
    assert challenge("custom", answers(180, 200), "3", "custom", champion_answers(180), GATE, 0).outcome == REPLACED


def test_max_regression_allows_a_small_loss() -> None:
    lenient = replace(GATE, max_regression=0.02)
    # 1.5 points worse: within 2 points.
    assert challenge("custom", answers(187, 200), "3", "", champion_answers(190), lenient, 0).outcome == REPLACED
    assert challenge("custom", answers(185, 200), "3", "", champion_answers(190), lenient, 0).outcome == STAYS


@pytest.mark.parametrize(("total", "max_regression", "champion_right"),
                         [(100, 0.01, 90), (200, 0.01, 190), (179, 3 / 179, 170)])
def test_exactly_max_regression_worse_is_accepted_one_image_more_is_not(total: int, max_regression: float,
                                                                        champion_right: int) -> None:
    # 188/200 - 190/200 is -0.010000000000000009 in floating point: the boundary must not hang on that.
    lenient = replace(GATE, max_regression=max_regression)
    allowed = round(max_regression * total)
    champion = champion_answers(champion_right, total)
    at_boundary = challenge("custom", answers(champion_right - allowed, total), "3", "", champion, lenient, 0)
    assert at_boundary.outcome == REPLACED, at_boundary.reasons
    beyond = challenge("custom", answers(champion_right - allowed - 1, total), "3", "", champion, lenient, 0)
    assert beyond.outcome == STAYS, beyond.reasons


def test_at_a_confidence_the_challenger_must_be_better_beyond_doubt() -> None:
    confident = replace(GATE, confidence=0.95)
    # Two points better on 200 images (right on 10 the champion missed, wrong on 6 it got) is not sure:
    # the interval of the difference reaches below 0.
    close = challenge("custom", answers(184, 200), "3", "", champion_answers(180, first_right=10), confident, 0)
    assert (close.comparison.first_only_right, close.comparison.second_only_right) == (10, 6)
    assert close.outcome == STAYS and close.comparison.difference_interval.low < 0
    assert "needs the 95% interval of the difference above" in close.reasons[0]
    # Right on 4 images the champion missed and wrong on none: the bootstrap interval leaves out 0, but
    # 4 to 0 happens by chance one time in sixteen (one-sided exact McNemar): not beyond doubt.
    few = challenge("custom", answers(184, 200), "3", "", champion_answers(180), confident, 0)
    assert (few.comparison.first_only_right, few.comparison.second_only_right) == (4, 0)
    assert few.comparison.difference_interval.low > 0 and few.comparison.mcnemar_p_value == pytest.approx(0.125)
    assert few.test.p_value == pytest.approx(1 / 16)    # one-sided: 4 to 0 by chance one time in 16
    assert few.outcome == STAYS and "and mcnemar exact, one-sided p < 0.05" in few.reasons[0]
    # Fifteen points better is.
    clear = challenge("custom", answers(190, 200), "3", "", champion_answers(160), confident, 0)
    assert clear.outcome == REPLACED and clear.comparison.difference_interval.low > 0


def test_an_interval_lies_above_a_bound_only_beyond_float_noise() -> None:
    # The interval's low end of a loss of exactly 6 images in 100 can come out as -0.06000000000000005 or
    # -0.05999999999999995: "above -max_regression" must not hang on those last bits.
    assert not above(-0.06 + 1e-15, -0.06) and not above(-0.06 - 1e-15, -0.06)
    assert above(-0.05, -0.06) and not above(-0.07, -0.06)
    assert at_least(-0.06 - 1e-15, -0.06)


def test_at_a_confidence_the_test_is_one_sided_for_the_challenger() -> None:
    confident = replace(GATE, confidence=0.95)
    # Right on 5 images the champion missed, wrong on none: one-sided p = 1/32 < 0.05, so it replaces
    # the champion (two-sided McNemar, p = 1/16, would have kept it).
    five = challenge("custom", answers(185, 200), "3", "", champion_answers(180), confident, 0)
    assert (five.comparison.first_only_right, five.comparison.second_only_right) == (5, 0)
    assert five.test.test == "mcnemar exact, one-sided" and five.test.p_value == pytest.approx(1 / 32)
    assert five.outcome == REPLACED
    assert five.to_json()["test"] == "mcnemar exact, one-sided" and five.to_json()["p_value"] == pytest.approx(1 / 32)


def test_for_other_metrics_a_paired_permutation_test_of_that_metric_decides() -> None:
    confident = replace(GATE, confidence=0.95, metric="balanced_accuracy")
    better = challenge("custom", answers(190, 200), "3", "", champion_answers(160), confident, seed=0)
    assert better.test.test == "paired permutation, one-sided" and better.test.p_value < 0.01
    assert better.outcome == REPLACED and "paired permutation, one-sided p < 0.05" in better.reasons[0]
    again = challenge("custom", answers(190, 200), "3", "", champion_answers(160), confident, seed=0)
    assert again.test == better.test    # seeded by base.seed
    worse = challenge("custom", answers(160, 200), "3", "", champion_answers(190), confident, seed=0)
    assert worse.test.p_value > 0.5 and worse.outcome == STAYS


def test_the_champion_decides_whether_a_passing_model_deploys() -> None:
    stays = ChampionCheck(STAYS, "3", "custom", reasons=["challenger ... champion v3 stays"])
    decision = decision_of(champion=stays, custom=(0.95, 0.9))
    assert decision.deploy is False and decision.model is None
    assert decision.candidates["custom"].verdict == DEPLOY
    assert summary_lines(decision)[-1] == "deployed: no, champion v3 stays (deploy/ unchanged)"
    for outcome in (NO_CHAMPION, REPLACED):
        assert decision_of(champion=ChampionCheck(outcome, "3"), custom=(0.95, 0.9)).model == "custom", outcome
    same = decision_of(champion=ChampionCheck(SAME_MODEL, "3"), custom=(0.95, 0.9))
    assert same.deploy is False and same.model is None
    assert summary_lines(same)[-1] == "deployed: nothing new, champion v3 is this same model (deploy/ unchanged)"
    put_back = decision_of(champion=restored(ChampionCheck(SAME_MODEL, "3"), "custom"), custom=(0.95, 0.9))
    assert put_back.deploy is True and put_back.model == "custom" and put_back.champion.outcome == RESTORED
    assert summary_lines(put_back)[-1] == "deployed: custom -> deploy/, put back from champion v3 (this same model)"
    assert "deploy/ did not hold it" in put_back.champion.reasons[0]
    unknown = decision_of(champion=ChampionCheck(UNKNOWN, reasons=["the registry cannot be reached"]),
                          custom=(0.95, 0.9))
    assert unknown.deploy is False
    assert summary_lines(unknown)[-1] == "deployed: nothing (the champion could not be checked; deploy/ unchanged)"


def test_a_champion_that_cannot_be_scored_fails_closed() -> None:
    lost = cannot_score("3", "custom", "its files cannot be loaded (No such file)", "image-classifier")
    decision = decision_of(champion=lost, custom=(0.99, 0.99))
    assert lost.outcome == UNKNOWN and decision.deploy is False and decision.model is None
    (reason,) = lost.reasons
    assert reason.startswith("champion v3 cannot be scored: its files cannot be loaded (No such file)")
    assert "nothing is deployed" in reason and "delete the alias image-classifier@champion" in reason
    assert summary_lines(decision)[-1] == "deployed: nothing (the champion could not be checked; deploy/ unchanged)"


def test_an_incomparable_champion_is_replaced_only_when_the_user_opted_in() -> None:
    why = "it takes 32x32 images with 3 channel(s), this data is 40x40 with 3"
    kept = not_comparable("custom", "3", "custom", why, GATE)
    refused = decision_of(champion=kept, custom=(0.99, 0.99))
    assert kept.outcome == NOT_COMPARABLE and refused.deploy is False
    assert "champion v3 stays; set gate.replace_incomparable: true" in kept.reasons[0]
    assert summary_lines(refused)[-1] == "deployed: no, champion v3 stays: it cannot be compared (deploy/ unchanged)"
    opted_in = replace(GATE, replace_incomparable=True)
    replaced = not_comparable("custom", "3", "custom", why, opted_in)
    decision = decision_of(opted_in, champion=replaced, custom=(0.99, 0.99))
    assert decision.deploy is True and decision.model == "custom"
    assert "gate.replace_incomparable is true, so the challenger replaces it" in replaced.reasons[0]


def test_decision_json_names_the_metric_the_intervals_and_the_champion() -> None:
    challenged = challenge("custom", answers(180, 200), "3", "resnet50", champion_answers(190), GATE, 0)
    data = decision_of(champion=challenged, custom=(0.95, 0.9), resnet50=(0.5, 0.4)).to_json()
    assert set(data) == {"deploy", "promoted", "model", "run_id", "metric", "confidence", "thresholds", "candidates",
                         "comparisons", "champion", "test_reuse"}
    assert data["metric"] == "accuracy" and data["confidence"] is None
    assert data["thresholds"] == {"min_train_score": 0.9, "min_test_score": 0.85, "max_regression": 0.0}
    custom = data["candidates"]["custom"]
    assert set(custom) == {"train_score", "validation_score", "test_score", "train_interval", "test_interval",
                           "verdict", "reasons", "calibration"}
    assert custom["test_score"] == 0.9 and custom["train_interval"] is None
    assert custom["test_interval"]["method"] == "wilson" and custom["test_interval"]["confidence"] == 0.95
    assert custom["test_interval"]["low"] < 0.9 < custom["test_interval"]["high"]
    assert set(data["comparisons"]) == {"custom_vs_resnet50"}
    champion = data["champion"]
    assert champion["outcome"] == "stays" and champion["stays"] is True and champion["version"] == "3"
    assert champion["score"] == 0.95 and champion["challenger_score"] == 0.9
    assert champion["difference"] == pytest.approx(-0.05)
    # One-sided in the challenger's favour: 0 to 10 on the discordant images is no evidence at all.
    assert champion["test"] == "mcnemar exact, one-sided" and champion["p_value"] == pytest.approx(1.0)
    assert champion["table"]["second_only_right"] == 10 and champion["challenger"] == "custom"
    assert champion["difference_interval"]["high"] < 0
    assert data["deploy"] is False and data["model"] is None
    assert json.loads(json.dumps(data)) == data


def test_the_summary_prints_intervals_and_the_comparison_in_words() -> None:
    challenged = challenge("custom", answers(180, 200), "3", "resnet50", champion_answers(190), GATE, 0)
    lines = summary_lines(decision_of(champion=challenged, custom=(0.95, 0.9)))
    text = "\n".join(lines)
    assert lines[0] == "gate metric: accuracy"
    interval = decision_of(custom=(0.95, 0.9)).candidates["custom"].test.interval
    assert f"0.9000 [{interval.low:.3f}, {interval.high:.3f}]" in text
    assert "champion: challenger custom 0.900 vs champion v3 0.950: -5.0 points" in text
    assert lines[-1] == "deployed: no, champion v3 stays (deploy/ unchanged)"
    assert lines[-2] == ("the registry is outside DVC, so this decision is re-made on each dvc repro (stage gate "
                         "is always_changed)")


def test_the_decision_needs_no_mlflow_and_no_tensorflow() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    code = "import sys, pipeline.decision; print(sorted({'mlflow', 'tensorflow', 'keras'} & set(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=120, check=True)
    assert completed.stdout.strip() == "[]"


def test_the_split_fingerprint_follows_the_images_and_labels_not_their_order() -> None:
    split = answers(150, 200)
    shuffled = SplitPredictions(split.paths[::-1], split.actual[::-1], split.predicted[::-1])
    relabelled = SplitPredictions(split.paths, ("dog",) + split.actual[1:], split.predicted)
    assert split_fingerprint(split) == split_fingerprint(shuffled)
    assert split_fingerprint(split) != split_fingerprint(relabelled)
    assert split_fingerprint(split) != split_fingerprint(answers(150, 199))


def test_test_reuse_warns_only_past_its_limit() -> None:
    at_limit, past = SplitReuse("abc", 20, 20), SplitReuse("abc", 21, 20)
    assert not at_limit.exceeded and "warning" not in at_limit.words()
    assert past.exceeded and "warning, decisions repeated on one test set overfit it" in past.words()
    decision = decision_of(custom=(0.95, 0.9))
    decision = decide(decision.candidates, decision.comparisons, FIRST_RUN, GATE, past)
    assert decision.to_json()["test_reuse"] == {"split": "abc", "models_judged": 21, "limit": 20, "exceeded": True}
    assert past.words() in summary_lines(decision)
