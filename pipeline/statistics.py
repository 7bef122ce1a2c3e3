"""How sure a score is: the gated metrics, their confidence intervals, and paired comparisons.

Every number comes from a maintained library: scikit-learn computes the metrics, SciPy the
intervals and tests. A score on a few hundred test images is an estimate; these say how far off it
may be, and whether one model's lead over another on the same images is more than chance.

- Accuracy gets a Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``); the other
  metrics a bootstrap interval (``scipy.stats.bootstrap``) over the images. The bootstrap and the
  permutation test score every resample at once, from per-class counts (:func:`batched_score`),
  which give scikit-learn's numbers row by row (``tests/test_statistics.py`` holds them to it):
  one scikit-learn call per resample costs about 2 ms of input checks, a minute for a few
  thousand images.
- Two models scored on the same images are compared image by image: the 2x2 table of right and
  wrong, an exact McNemar test (a two-sided binomial test on the images where exactly one of the two
  is right, ``scipy.stats.binomtest``), and a paired bootstrap interval of the difference in the
  metric, seeded so it is the same on every run.
- Whether a challenger beats the champion is one-sided, on the gated metric (:func:`better_test`):
  exact McNemar (``binomtest``, alternative ``greater``) for accuracy, a paired permutation test
  (``scipy.stats.permutation_test``) of the metric's difference for the others.
- Two recipes cross-validated on the same folds, in one or more deals of the folds, are compared
  fold by fold (:func:`repeated_cv_p_value`): the corrected repeated k-fold t-test, SciPy's t
  distribution with the variance widened for folds that share their training photos.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

REPORTING_CONFIDENCE = 0.95     # the level of intervals that are reported but do not decide anything
BOOTSTRAP_RESAMPLES = 9999      # resamples of a bootstrap interval or a permutation test (scored all at once)
BATCH = 500                     # resamples scored at once: a few MB per class for a few thousand images
MINIMUM_IMAGES = 2              # fewer cannot vary, so no interval says anything


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval and how it was made."""

    low: float
    high: float
    confidence: float
    method: str

    def text(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same images: the right/wrong table, the McNemar test, the difference.

    ``difference`` is first minus second in the metric; ``first_only_right`` counts the images the
    first model got right and the second wrong.
    """

    first: str
    second: str
    metric: str
    first_score: float
    second_score: float
    difference: float
    both_right: int
    first_only_right: int
    second_only_right: int
    both_wrong: int
    mcnemar_p_value: float
    difference_interval: Interval | None

    def significant(self, alpha: float = 1 - REPORTING_CONFIDENCE) -> bool:
        """Whether the two disagree on more images than chance would explain (McNemar, level ``alpha``)."""
        return self.mcnemar_p_value < alpha

    def to_json(self) -> dict:
        data = asdict(self)
        data["table"] = {"both_right": data.pop("both_right"), "first_only_right": data.pop("first_only_right"),
                         "second_only_right": data.pop("second_only_right"), "both_wrong": data.pop("both_wrong")}
        return data


def score(metric: str, actual: np.ndarray, predicted: np.ndarray) -> float:
    """The metric (scikit-learn's) of ``predicted`` labels against ``actual`` ones."""
    # Imported here, not at the top: `python -m pipeline.gate --check` reads a JSON file and should
    # not pay for SciPy and scikit-learn.
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score,
        "macro_f1": lambda a, p: f1_score(a, p, average="macro", zero_division=0)}
    with warnings.catch_warnings():
        # balanced_accuracy warns when a predicted class never occurs in ``actual``: not an error here.
        warnings.simplefilter("ignore", UserWarning)
        return float(metrics[metric](np.asarray(actual), np.asarray(predicted)))


def interval(metric: str, actual: np.ndarray, predicted: np.ndarray, confidence: float,
             seed: int) -> Interval | None:
    """A ``confidence`` interval for the metric on these images; None when there are too few of them."""
    actual, predicted = np.asarray(actual), np.asarray(predicted)
    if len(actual) < MINIMUM_IMAGES:
        return None
    if metric == "accuracy":
        from scipy import stats

        right = int(np.sum(actual == predicted))
        ci = stats.binomtest(right, len(actual)).proportion_ci(confidence_level=confidence, method="wilson")
        return Interval(float(ci.low), float(ci.high), confidence, "wilson")
    codes = _codes(actual, predicted)
    return _bootstrap(codes, lambda a, p, axis=-1: batched_score(metric, a, p, axis), confidence, seed)


def compare(first: str, second: str, metric: str, actual: np.ndarray, first_predicted: np.ndarray,
            second_predicted: np.ndarray, confidence: float, seed: int) -> PairedComparison:
    """Compare two models' predictions for the same images (see the module's description)."""
    actual = np.asarray(actual)
    first_predicted, second_predicted = np.asarray(first_predicted), np.asarray(second_predicted)
    first_right, second_right = first_predicted == actual, second_predicted == actual
    first_only = int(np.sum(first_right & ~second_right))
    second_only = int(np.sum(~first_right & second_right))
    first_score, second_score = score(metric, actual, first_predicted), score(metric, actual, second_predicted)
    return PairedComparison(
        first, second, metric, first_score, second_score, first_score - second_score,
        both_right=int(np.sum(first_right & second_right)), first_only_right=first_only,
        second_only_right=second_only, both_wrong=int(np.sum(~first_right & ~second_right)),
        mcnemar_p_value=mcnemar_exact(first_only, second_only),
        difference_interval=_difference_interval(metric, actual, first_predicted, second_predicted, confidence,
                                                 seed))


def mcnemar_exact(first_only_right: int, second_only_right: int, alternative: str = "two-sided") -> float:
    """Exact McNemar p-value: a binomial test (p = 1/2) on the discordant images, two-sided or, with
    ``alternative="greater"``, that the first is right more often.

    With no discordant image the two models cannot be told apart: p = 1.
    """
    from scipy import stats

    discordant = first_only_right + second_only_right
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(first_only_right, discordant, 0.5, alternative=alternative).pvalue)


def repeated_cv_p_value(differences: np.ndarray, test_per_train: float) -> float:
    """Two-sided p-value that two recipes do equally well, from their score differences on the same
    folds of one or more repetitions of cross-validation: the corrected repeated k-fold t-test
    (Nadeau and Bengio 2003, in the form of Bouckaert and Frank 2004). Folds share most of their
    training photos, so their differences are not independent; the test widens the variance of the
    mean from 1/n to 1/n + test/train photos, with n - 1 degrees of freedom (``scipy.stats.t``).

    Differences all equal (no spread): p = 1 when they are zero, 0 when every fold moved by the same amount.
    """
    from scipy import stats

    differences = np.asarray(differences, dtype=float)
    n = len(differences)
    if n < 2:
        raise ValueError("the corrected t-test needs the differences of at least two folds")
    spread = float(np.var(differences, ddof=1))
    mean = float(differences.mean())
    if spread == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / np.sqrt((1 / n + test_per_train) * spread)
    return float(2 * stats.t.sf(abs(t), df=n - 1))


@dataclass(frozen=True)
class OneSidedTest:
    """Whether the first model is better than the second in the metric: which test, its p-value."""

    test: str
    p_value: float


def better_test(metric: str, actual: np.ndarray, first: np.ndarray, second: np.ndarray, seed: int) -> OneSidedTest:
    """One-sided test that ``first`` beats ``second`` on the same images, in ``metric``.

    Accuracy: exact McNemar, a one-sided binomial test (p = 1/2) on the images where exactly one is
    right. Other metrics: a paired permutation test of the metric's difference (each image's two
    answers swapped at random, ``scipy.stats.permutation_test``), seeded.
    """
    from scipy import stats

    actual, first, second = np.asarray(actual), np.asarray(first), np.asarray(second)
    if metric == "accuracy":
        first_only = int(np.sum((first == actual) & (second != actual)))
        second_only = int(np.sum((first != actual) & (second == actual)))
        return OneSidedTest("mcnemar exact, one-sided", mcnemar_exact(first_only, second_only, "greater"))
    if np.array_equal(first, second):
        return OneSidedTest("paired permutation, one-sided", 1.0)
    actual, first, second = _codes(actual, first, second)

    def difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return batched_score(metric, actual, a, axis) - batched_score(metric, actual, b, axis)

    result = stats.permutation_test((first, second), difference, permutation_type="samples", alternative="greater",
                                    vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, batch=BATCH,
                                    rng=np.random.default_rng(seed))
    return OneSidedTest("paired permutation, one-sided", float(result.pvalue))


def _difference_interval(metric: str, actual: np.ndarray, first: np.ndarray, second: np.ndarray,
                         confidence: float, seed: int) -> Interval | None:
    if len(actual) < MINIMUM_IMAGES:
        return None
    if np.array_equal(first, second):
        # The same answer on every image: every resample differs by exactly zero.
        return Interval(0.0, 0.0, confidence, "identical predictions")
    if metric == "accuracy":
        # Accuracy is the mean of right (1) and wrong (0).
        first_right, second_right = (first == actual).astype(float), (second == actual).astype(float)
        return _bootstrap((first_right, second_right), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis),
                          confidence, seed)
    return _bootstrap(_codes(actual, first, second),
                      lambda a, p, q, axis=-1: batched_score(metric, a, p, axis) - batched_score(metric, a, q, axis),
                      confidence, seed)


def batched_score(metric: str, actual: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """``balanced_accuracy`` or ``macro_f1`` of every row of integer labels at once (the images along
    ``axis``), as scikit-learn's function gives it for each row alone: balanced accuracy is the mean
    recall of the classes that occur in that row's ``actual``; macro F1 the mean of 2 TP / (2 TP + FP
    + FN) over the classes that occur in its ``actual`` or ``predicted`` (0 where a class is never
    right, as ``zero_division=0``)."""
    actual, predicted = np.broadcast_arrays(np.moveaxis(actual, axis, -1), np.moveaxis(predicted, axis, -1))
    classes = np.arange(int(max(actual.max(initial=0), predicted.max(initial=0))) + 1)[:, None]
    is_actual, is_predicted = actual[..., None, :] == classes, predicted[..., None, :] == classes
    right = np.sum(is_actual & is_predicted, axis=-1)               # per row and class: true positives
    occurs, answered = np.sum(is_actual, axis=-1), np.sum(is_predicted, axis=-1)
    if metric == "balanced_accuracy":
        recall = np.divide(right, occurs, out=np.zeros(right.shape), where=occurs > 0)
        return recall.sum(axis=-1) / np.count_nonzero(occurs, axis=-1)
    if metric == "macro_f1":
        seen = occurs + answered                                    # 2 TP + FP + FN
        f1 = np.divide(2 * right, seen, out=np.zeros(right.shape), where=seen > 0)
        return f1.sum(axis=-1) / np.count_nonzero(seen, axis=-1)
    raise ValueError(f"no batched form of {metric}")


def _codes(*labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same label arrays as small integers (one code per class name), for :func:`batched_score`."""
    _, codes = np.unique(np.concatenate([np.asarray(each) for each in labels]), return_inverse=True)
    return tuple(np.split(codes.reshape(-1), len(labels)))


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, confidence: float, seed: int) -> Interval:
    """SciPy's paired bootstrap (BCa; percentile where BCa is undefined, e.g. a constant jackknife),
    the statistic scoring a batch of resamples at once."""
    from scipy import stats

    resamples = BOOTSTRAP_RESAMPLES
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # DegenerateDataWarning: handled by the fallback below
            result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                                     batch=BATCH, confidence_level=confidence, method=method,
                                     rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return Interval(float(low), float(high), confidence, f"bootstrap {method}, {resamples} resamples")
    # Every resample gave the same value: the interval is that value.
    value = float(statistic(*data))
    return Interval(value, value, confidence, "bootstrap (constant)")
