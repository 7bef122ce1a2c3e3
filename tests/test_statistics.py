"""The gate's statistics against tables worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.statistics import (batched_score, better_test, compare, interval, mcnemar_exact, repeated_cv_p_value,
                                 score)

CATS_AND_DOGS = np.array(["cat"] * 6 + ["dog"] * 4)


def test_mcnemar_exact_on_hand_computed_tables() -> None:
    # No discordant image: nothing tells the models apart.
    assert mcnemar_exact(0, 0) == 1.0
    # 5 to 0: two-sided binomial tail 2 * (1/2)^5.
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    # 1 to 9: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    # An even split is the most likely outcome under "no difference".
    assert mcnemar_exact(3, 3) == 1.0


def test_the_two_by_two_table_counts_each_image_once() -> None:
    actual = np.array([0, 0, 1, 1, 0])
    first = np.array([0, 1, 1, 1, 0])     # right, wrong, right, right, right
    second = np.array([0, 0, 0, 1, 1])    # right, right, wrong, right, wrong
    result = compare("a", "b", "accuracy", actual, first, second, 0.95, seed=0)
    assert (result.both_right, result.first_only_right, result.second_only_right, result.both_wrong) == (2, 2, 1, 0)
    assert result.first_score == pytest.approx(0.8) and result.second_score == pytest.approx(0.6)
    assert result.difference == pytest.approx(0.2)
    assert result.mcnemar_p_value == pytest.approx(1.0)   # 2 to 1: the binomial two-sided p is 1
    assert result.to_json()["table"] == {"both_right": 2, "first_only_right": 2, "second_only_right": 1,
                                         "both_wrong": 0}


def test_models_that_agree_on_every_image_cannot_be_told_apart() -> None:
    predicted = np.array(["cat"] * 5 + ["dog"] * 5)
    result = compare("a", "b", "accuracy", CATS_AND_DOGS, predicted, predicted.copy(), 0.95, seed=0)
    assert result.difference == 0.0 and result.mcnemar_p_value == 1.0 and not result.significant()
    assert (result.difference_interval.low, result.difference_interval.high) == (0.0, 0.0)
    assert result.first_only_right == result.second_only_right == 0


def test_models_that_disagree_on_every_image() -> None:
    right = CATS_AND_DOGS.copy()
    wrong = np.where(CATS_AND_DOGS == "cat", "dog", "cat")
    result = compare("a", "b", "accuracy", CATS_AND_DOGS, right, wrong, 0.95, seed=0)
    assert (result.both_right, result.first_only_right, result.second_only_right, result.both_wrong) == (0, 10, 0, 0)
    assert result.difference == 1.0
    assert result.mcnemar_p_value == pytest.approx(2 / 1024) and result.significant()
    # Every resample differs by exactly one.
    assert (result.difference_interval.low, result.difference_interval.high) == (1.0, 1.0)


def test_the_difference_interval_is_seeded_and_brackets_the_difference() -> None:
    rng = np.random.default_rng(3)
    actual = rng.integers(0, 2, 300)
    first = np.where(rng.random(300) < 0.9, actual, 1 - actual)
    second = np.where(rng.random(300) < 0.8, actual, 1 - actual)
    one = compare("a", "b", "accuracy", actual, first, second, 0.95, seed=7)
    again = compare("a", "b", "accuracy", actual, first, second, 0.95, seed=7)
    assert one.difference_interval == again.difference_interval
    assert one.difference_interval.low < one.difference < one.difference_interval.high
    # About ten points apart on 300 images: clearly more than chance.
    assert one.difference_interval.low > 0 and one.significant()
    wider = compare("a", "b", "accuracy", actual, first, second, 0.99, seed=7).difference_interval
    assert wider.low < one.difference_interval.low and wider.high > one.difference_interval.high


def test_wilson_interval_for_accuracy() -> None:
    # 8 right of 10 at 95 %: the Wilson score interval (0.4902, 0.9433).
    actual = np.zeros(10, dtype=int)
    predicted = np.array([0] * 8 + [1] * 2)
    result = interval("accuracy", actual, predicted, 0.95, seed=0)
    assert result.method == "wilson"
    assert (result.low, result.high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    # All right still leaves room below 1 (unlike the plain normal approximation).
    perfect = interval("accuracy", actual, actual, 0.95, seed=0)
    assert perfect.high == pytest.approx(1.0) and perfect.low < 0.75


def test_bootstrap_interval_for_the_other_metrics() -> None:
    rng = np.random.default_rng(0)
    actual = np.array([0] * 80 + [1] * 20)                 # an unbalanced pair of classes
    predicted = np.where(rng.random(100) < 0.85, actual, 1 - actual)
    for metric in ("balanced_accuracy", "macro_f1"):
        value = score(metric, actual, predicted)
        result = interval(metric, actual, predicted, 0.95, seed=1)
        assert result.method.startswith("bootstrap")
        assert result.low < value < result.high, metric
        assert result == interval(metric, actual, predicted, 0.95, seed=1)


def test_the_metrics_are_scikit_learns() -> None:
    # A model that always answers the big class: accuracy flatters it, the other two do not.
    actual = np.array([0] * 9 + [1])
    always_zero = np.zeros(10, dtype=int)
    assert score("accuracy", actual, always_zero) == pytest.approx(0.9)
    assert score("balanced_accuracy", actual, always_zero) == pytest.approx(0.5)
    assert score("macro_f1", actual, always_zero) == pytest.approx((18 / 19 + 0) / 2)


@pytest.mark.parametrize("metric", ["balanced_accuracy", "macro_f1"])
def test_every_resample_is_scored_as_scikit_learn_scores_it(metric: str) -> None:
    """The bootstrap's batched metric against scikit-learn's, row by row, on resamples of the kind a
    bootstrap draws: some rows miss a class in the answers, in the actual labels, or in both."""
    rng = np.random.default_rng(5)
    actual = rng.integers(0, 4, size=(300, 12))
    predicted = np.where(rng.random((300, 12)) < 0.6, actual, rng.integers(0, 4, size=(300, 12)))
    actual[:20] = np.where(actual[:20] == 3, 2, actual[:20])          # class 3 never occurs here ...
    predicted[10:30] = np.where(predicted[10:30] == 1, 0, predicted[10:30])   # ... class 1 never answered
    predicted[40] = actual[40]                                         # every answer right
    batched = batched_score(metric, actual, predicted)
    assert batched.shape == (300,)
    assert batched == pytest.approx([score(metric, a, p) for a, p in zip(actual, predicted)], abs=1e-12)
    # The images can lie along any axis.
    assert batched_score(metric, actual.T, predicted.T, axis=0) == pytest.approx(batched, abs=1e-12)


def test_too_few_images_for_an_interval() -> None:
    one = np.array([1])
    assert interval("accuracy", one, one, 0.95, seed=0) is None
    assert compare("a", "b", "accuracy", one, one, one, 0.95, seed=0).difference_interval is None


def test_the_one_sided_test_on_hand_computed_tables() -> None:
    actual = np.array(["cat"] * 4 + ["dog"] * 4)
    champion = actual.copy()
    champion[[0, 1, 6]] = ["dog", "dog", "cat"]     # wrong on 3 images the challenger gets right
    # Accuracy: one-sided exact McNemar on 3 to 0, (1/2)^3; the other way round nothing favours the first.
    assert better_test("accuracy", actual, actual, champion, seed=0).p_value == pytest.approx(1 / 8)
    assert better_test("accuracy", actual, champion, actual, seed=0).p_value == pytest.approx(1.0)
    # Balanced accuracy: 2^8 swaps of the paired answers, enumerated; only those that leave the 3
    # discordant pairs unswapped reach the observed difference: 2^5 / 2^8.
    result = better_test("balanced_accuracy", actual, actual, champion, seed=0)
    assert result.test == "paired permutation, one-sided" and result.p_value == pytest.approx(1 / 8)
    assert better_test("macro_f1", actual, actual, actual.copy(), seed=0).p_value == 1.0


def test_repeated_cv_p_value_widens_the_t_test_by_the_test_share() -> None:
    from scipy import stats

    differences = np.array([0.01, 0.02, 0.03, 0.00, 0.04])
    # Without the correction it is the one-sample t-test of the differences against zero.
    assert repeated_cv_p_value(differences, 0.0) == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue)
    # By hand: mean 0.02, variance 0.00025, t = 0.02 / sqrt((1/5 + 0.25) * 0.00025) = 1.8856, 4 degrees of freedom.
    assert repeated_cv_p_value(differences, 0.25) == pytest.approx(2 * stats.t.sf(1.8856, 4), rel=1e-4)
    assert repeated_cv_p_value(differences, 0.25) > repeated_cv_p_value(differences, 0.0)
    assert repeated_cv_p_value(-differences, 0.25) == pytest.approx(repeated_cv_p_value(differences, 0.25))
    assert repeated_cv_p_value(np.zeros(4), 0.25) == 1.0
    with pytest.raises(ValueError, match="at least two folds"):
        repeated_cv_p_value(np.array([0.01]), 0.25)
