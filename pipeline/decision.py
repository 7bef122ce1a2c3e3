"""The gate's decision, apart from the registry and the files: each model's verdict, the choice among
them, the challenger against the champion's answers, and the summary in words.

For each model, in ``gate.metric`` (accuracy by default): the score on the training set below
``min_train_score`` -> ``underfit`` (it has not learned; go back to the loss and optimizer). Train
passes but test below ``min_test_score`` -> ``overfit`` (it memorised the training data). Both pass
-> ``deploy``. With ``gate.confidence`` set, a threshold passes only if the lower end of the
score's confidence interval clears it. With ``gate.max_calibration_error`` set, a model that passes
both but whose expected calibration error on the test set is above it -> ``miscalibrated``.

Among the models that pass, the best validation score is the challenger. When the registry already holds
a ``champion``, the challenger replaces it only if it is worse on the same test images by at most
``max_regression`` (at ``confidence``, when set: the interval of the difference must lie above
``-max_regression``). The statistics are in :mod:`pipeline.statistics`; :mod:`pipeline.gate` fetches
the champion's answers, deploys and registers.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations

import numpy as np

from pipeline import statistics
from pipeline.artifacts import SplitPredictions
from pipeline.errors import PipelineError
from pipeline.params import GateParams
from pipeline.statistics import Interval, PairedComparison

UNDERFIT, OVERFIT, DEPLOY = "underfit", "overfit", "deploy"
MISCALIBRATED = "miscalibrated"     # only with gate.max_calibration_error set

# What became of the registered champion.
NO_CHAMPION = "none"                # the first promotion: nothing to compare with
SAME_MODEL = "same model"           # the challenger is the champion already: nothing new to deploy
RESTORED = "restored"               # the challenger is the champion, which deploy/ lacked: this run put it back
NOT_COMPARABLE = "not comparable"   # other classes or input shape: replaced only if gate.replace_incomparable
UNKNOWN = "unknown"                 # the registry or the champion's files cannot be used: nothing is deployed
STAYS, REPLACED = "stays", "replaced"
# Scores are fractions of images, so two that should tie can differ in the last bits (188/200 - 190/200
# is -0.010000000000000009): a bound is met within this much, far below one image in a million.
SCORE_TOLERANCE = 1e-9
_CHALLENGER_DEPLOYS = (NO_CHAMPION, REPLACED, RESTORED)


@dataclass(frozen=True)
class Estimate:
    """A model's score on one split and, where one was made, its confidence interval."""

    score: float
    interval: Interval | None = None

    def text(self) -> str:
        return f"{self.score:.4f}" + (f" {self.interval.text()}" if self.interval else "")


@dataclass(frozen=True)
class CalibrationNote:
    """How sure a model is against how often it is right, on the test set (from the evaluate stage)."""

    ece: float                  # expected calibration error
    brier: float
    temperature: float = 1.0    # built into the model by temperature scaling (1 = none)
    gradcam: str = ""           # the picture of its surest mistakes, with Grad-CAM heatmaps

    def words(self) -> str:
        scaled = f"temperature {self.temperature:.2f}" if self.temperature != 1.0 else "no temperature scaling"
        pictured = f"; surest mistakes pictured in {self.gradcam}" if self.gradcam else ""
        return f"test ECE {self.ece:.4f}, Brier {self.brier:.4f} ({scaled}){pictured}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """One model's scores, its verdict and the reasons for it."""

    train: Estimate
    test: Estimate
    verdict: str
    reasons: list[str]
    validation: Estimate | None = None     # what chooses among the passing models
    calibration: CalibrationNote | None = None

    def to_json(self) -> dict:
        return {"train_score": self.train.score,
                "validation_score": self.validation.score if self.validation else None, "test_score": self.test.score,
                "train_interval": _interval_json(self.train.interval),
                "test_interval": _interval_json(self.test.interval), "verdict": self.verdict,
                "reasons": self.reasons, "calibration": self.calibration.to_json() if self.calibration else None}


@dataclass(frozen=True)
class ChampionCheck:
    """What the gate found in the registry and what it means for the challenger."""

    outcome: str
    version: str | None = None
    model: str | None = None
    comparison: PairedComparison | None = None
    reasons: list[str] = field(default_factory=list)
    test: statistics.OneSidedTest | None = None     # that the challenger is better: decides at a confidence

    @property
    def challenger_deploys(self) -> bool:
        return self.outcome in _CHALLENGER_DEPLOYS

    def to_json(self) -> dict:
        compared = self.comparison.to_json() if self.comparison else {}
        return {"outcome": self.outcome, "version": self.version, "model": self.model,
                "stays": self.outcome == STAYS, "challenger": compared.get("first"),
                "score": compared.get("second_score"), "challenger_score": compared.get("first_score"),
                "difference": compared.get("difference"), "difference_interval": compared.get("difference_interval"),
                "test": self.test.test if self.test else None, "p_value": self.test.p_value if self.test else None,
                "table": compared.get("table"), "reasons": self.reasons}


@dataclass(frozen=True)
class SplitReuse:
    """How many models have been judged on this same test split: each decision taken on one test set
    fits the choices to its images a little more, so past ``limit`` the set no longer measures new data."""

    split: str              # the test split's fingerprint: its images and labels
    models_judged: int      # distinct training runs judged on it, these included
    limit: int              # gate.max_test_reuse

    @property
    def exceeded(self) -> bool:
        return self.models_judged > self.limit

    def words(self) -> str:
        text = (f"test split {self.split} has judged {self.models_judged} model(s) so far "
                f"(gate.max_test_reuse {self.limit})")
        if self.exceeded:
            text += (": warning, decisions repeated on one test set overfit it; draw a new test split "
                     "(another base.seed or split.ratios, or new images) and judge the champion on it again")
        return text

    def to_json(self) -> dict:
        return {"split": self.split, "models_judged": self.models_judged, "limit": self.limit,
                "exceeded": self.exceeded}


def split_fingerprint(test: SplitPredictions) -> str:
    """A short digest of the test images and their labels: the same split gives the same fingerprint."""
    rows = "\n".join(sorted(f"{path}\t{label}" for path, label in zip(test.paths, test.actual)))
    return hashlib.sha256(rows.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Decision:
    """What the gate decided: whether to deploy, which model, every candidate's verdict, the
    comparisons between them and with the champion."""

    deploy: bool
    model: str | None
    metric: str
    confidence: float | None
    thresholds: dict
    candidates: dict[str, Verdict]
    comparisons: list[PairedComparison]
    champion: ChampionCheck
    test_reuse: SplitReuse | None = None     # None when the registry could not be asked
    promote: bool = True                     # gate.promote: false decides without registering or deploying
    run_id: str = ""                         # the chosen model's training run, which the gate records

    @property
    def promoted(self) -> bool:
        """Whether the chosen model is registered as the champion and put in deploy/: ``deploy`` says
        the gate allows it, ``gate.promote: false`` (compare only) keeps it from happening."""
        return self.deploy and self.promote

    def to_json(self) -> dict:
        return {"deploy": self.deploy, "promoted": self.promoted, "model": self.model, "run_id": self.run_id or None,
                "metric": self.metric,
                "confidence": self.confidence,
                "thresholds": self.thresholds,
                "candidates": {name: verdict.to_json() for name, verdict in self.candidates.items()},
                "comparisons": {f"{c.first}_vs_{c.second}": c.to_json() for c in self.comparisons},
                "champion": self.champion.to_json(),
                "test_reuse": self.test_reuse.to_json() if self.test_reuse else None}


def estimate(metric: str, answers: SplitPredictions, level: float | None, seed: int) -> Estimate:
    """The score of one split's answers, with an interval at ``level`` (none when ``level`` is None)."""
    actual, predicted = np.asarray(answers.actual), np.asarray(answers.predicted)
    score = statistics.score(metric, actual, predicted)
    return Estimate(score, None if level is None else statistics.interval(metric, actual, predicted, level, seed))


def judge(train: Estimate, test: Estimate, gate: GateParams) -> Verdict:
    """The flowchart for one model: train threshold first, then test threshold."""
    train_passes, train_reason = _threshold("train", train, gate.min_train_score, "min_train_score", gate)
    if not train_passes:
        return Verdict(train, test, UNDERFIT, [
            f"{train_reason}: the model has not learned the training set (revisit the loss, optimizer, epochs)"])
    test_passes, test_reason = _threshold("test", test, gate.min_test_score, "min_test_score", gate)
    if not test_passes:
        return Verdict(train, test, OVERFIT, [train_reason, (
            f"{test_reason}: it does well on data it has seen but not on new data "
            "(more data, augmentation, regularisation)")])
    return Verdict(train, test, DEPLOY, [train_reason, test_reason])


def judge_calibration(verdict: Verdict, note: CalibrationNote | None, gate: GateParams) -> Verdict:
    """With ``gate.max_calibration_error`` set, a model that passed the thresholds but whose test ECE
    is above it is ``miscalibrated`` (as is one without calibration figures); unset, the verdict stands."""
    if gate.max_calibration_error is None or verdict.verdict != DEPLOY:
        return verdict
    limit = gate.max_calibration_error
    if note is None:
        return replace(verdict, verdict=MISCALIBRATED, reasons=[
            *verdict.reasons, f"no calibration figures to hold against max_calibration_error {limit} "
                              "(rerun the evaluate stage: dvc repro -f evaluate)"])
    if note.ece <= limit:
        return replace(verdict, reasons=[*verdict.reasons,
                                         f"test ECE {note.ece:.4f} <= max_calibration_error {limit}"])
    return replace(verdict, verdict=MISCALIBRATED, reasons=[
        *verdict.reasons, f"test ECE {note.ece:.4f} > max_calibration_error {limit}: its probabilities do not "
                          "mean what they say (switch on temperature_scaling in its training section; "
                          "docs/calibration.md)"])


def judge_all(predictions: dict[str, dict[str, SplitPredictions]], gate: GateParams, seed: int,
              calibration: dict[str, CalibrationNote] | None = None) -> dict[str, Verdict]:
    """Every model's verdict, with its validation score where it has one and its calibration where
    the evaluate stage measured it. The test score always carries an interval (at ``gate.confidence``,
    or the reporting level); the train score only when the thresholds are judged at a confidence."""
    test_level = _level(gate)
    verdicts = {}
    for name, splits in predictions.items():
        verdict = judge(estimate(gate.metric, splits["train"], gate.confidence, seed),
                        estimate(gate.metric, splits["test"], test_level, seed), gate)
        validation = estimate(gate.metric, splits["validation"], None, seed) if "validation" in splits else None
        note = (calibration or {}).get(name)
        verdicts[name] = judge_calibration(replace(verdict, validation=validation, calibration=note), note, gate)
    return verdicts


def best_passing(candidates: dict[str, Verdict]) -> str | None:
    """The passing model with the best validation score (its test score where it has none); ties go
    to the first (the smaller custom CNN). Choosing on the test set and then judging on it would
    favour whichever model was luckiest on those images: the test set decides the thresholds and the
    champion comparison only."""
    chosen, best = None, 0.0
    for name, verdict in candidates.items():
        if verdict.verdict != DEPLOY:
            continue
        score = (verdict.validation or verdict.test).score
        if chosen is None or not at_least(best, score):   # a tie within float noise keeps the first
            chosen, best = name, score
    return chosen


def compare_models(predictions: dict[str, dict[str, SplitPredictions]], gate: GateParams,
                   seed: int) -> list[PairedComparison]:
    """Each pair of models on the same test images (custom vs resnet50)."""
    level = _level(gate)
    comparisons = []
    for first, second in combinations(predictions, 2):
        a, b = predictions[first]["test"], predictions[second]["test"]
        if a.paths != b.paths or a.actual != b.actual:
            raise PipelineError(f"the test predictions of {first} and {second} are for different images: "
                                "rerun the evaluate stage (dvc repro -f evaluate)")
        comparisons.append(statistics.compare(first, second, gate.metric, np.asarray(a.actual),
                                              np.asarray(a.predicted), np.asarray(b.predicted), level, seed))
    return comparisons


def challenge(challenger: str, answers: SplitPredictions, champion_version: str, champion_model: str,
              champion_predicted: list[str], gate: GateParams, seed: int) -> ChampionCheck:
    """The challenger against the champion's answers on the same test images: stays or replaced."""
    level = _level(gate)
    comparison = statistics.compare(challenger, f"champion v{champion_version}", gate.metric,
                                    np.asarray(answers.actual), np.asarray(answers.predicted),
                                    np.asarray(champion_predicted), level, seed)
    better = statistics.better_test(gate.metric, answers.actual, answers.predicted, champion_predicted, seed)
    words = (f"challenger {comparison_words(comparison)}; better by a {better.test} test on {gate.metric}: "
             f"p = {better.p_value:.2g}")
    if gate.confidence is None:
        replaces = at_least(comparison.difference, -gate.max_regression)
        rule = (f"worse by at most max_regression {gate.max_regression:g}" if gate.max_regression
                else "at least as good")
    else:
        low = comparison.difference_interval.low if comparison.difference_interval else None
        replaces = low is not None and above(low, -gate.max_regression)
        rule = f"the {level:.0%} interval of the difference above {-gate.max_regression:g}"
        if not gate.max_regression:
            # "Better beyond doubt" is also what the one-sided test says: with few images where the two
            # disagree, a bootstrap interval can leave out 0 while the test's p is above 1 - level.
            replaces = replaces and better.p_value < 1 - level
            rule += f" and {better.test} p < {1 - level:.2g}"
    outcome = REPLACED if replaces else STAYS
    replacing = "replaces" if gate.promote else "would replace (compare only)"
    verdict = (f"{replacing} champion v{champion_version}" if replaces
               else f"champion v{champion_version} stays")
    return ChampionCheck(outcome, champion_version, champion_model, comparison,
                         [f"{words}; needs {rule}: {verdict}"], better)


def not_comparable(challenger: str, champion_version: str, champion_model: str | None, why: str,
                   gate: GateParams) -> ChampionCheck:
    """A champion made for other classes or another input shape: it stays unless the user opted in
    (``gate.replace_incomparable``) to replacing it by a challenger judged on the thresholds alone."""
    if gate.replace_incomparable:
        then = ("gate.replace_incomparable is true, so the challenger replaces it, judged by the thresholds "
                "alone")
    else:
        then = (f"champion v{champion_version} stays; set gate.replace_incomparable: true to replace a champion "
                "that cannot be compared")
    return ChampionCheck(NOT_COMPARABLE, champion_version, champion_model, reasons=[
        f"champion v{champion_version} cannot be compared with {challenger}: {why}; {then}"])


def restored(same: ChampionCheck, challenger: str) -> ChampionCheck:
    """The champion is this challenger (``same``, outcome same model), and deploy/ did not hold it until
    this run put it back from the registry: a gate killed after moving the alias, or deploy/ changed by
    hand. The model is deployed by this run, so the decision says so (and CI ships it), without
    registering it again."""
    return replace(same, outcome=RESTORED, reasons=[
        f"champion v{same.version} is this {challenger} model already (same training run), and deploy/ did not "
        "hold it (a gate stopped half-way, or deploy/ changed by hand): put back from the registry"])


def cannot_score(champion_version: str, champion_model: str | None, why: str, registered_name: str) -> ChampionCheck:
    """A champion that exists but whose files cannot be fetched or loaded: nothing is deployed (fail closed)."""
    return ChampionCheck(UNKNOWN, champion_version, champion_model, reasons=[
        f"champion v{champion_version} cannot be scored: {why}; nothing is deployed (deploy/ is left as it "
        f"was). Restore its files in the artifact store and rerun the gate, or, if that version is lost for "
        f"good, delete the alias {registered_name}@champion and rerun to promote without a comparison"])


def at_least(value: float, bound: float) -> bool:
    """``value >= bound`` for scores, within :data:`SCORE_TOLERANCE` (exactly at a bound passes)."""
    return value >= bound - SCORE_TOLERANCE


def above(value: float, bound: float) -> bool:
    """``value > bound`` for scores, beyond :data:`SCORE_TOLERANCE` (exactly at a bound does not pass)."""
    return value > bound + SCORE_TOLERANCE


def comparison_words(comparison: PairedComparison) -> str:
    """One comparison in words: scores, the difference in points, the McNemar test."""
    interval = comparison.difference_interval
    spread = (f" (difference {interval.confidence:.0%} interval [{100 * interval.low:+.1f}, "
              f"{100 * interval.high:+.1f}])") if interval else ""
    significance = "significant" if comparison.significant() else "not significant"
    return (f"{comparison.first} {comparison.first_score:.3f} vs {comparison.second} {comparison.second_score:.3f}: "
            f"{100 * comparison.difference:+.1f} points{spread}, McNemar p = {comparison.mcnemar_p_value:.2g}, "
            f"{significance}")


def decide(candidates: dict[str, Verdict], comparisons: list[PairedComparison], champion: ChampionCheck,
           gate: GateParams, test_reuse: SplitReuse | None = None) -> Decision:
    """Put the verdicts and the champion check together: deploy only a passing challenger that the
    champion check lets through."""
    chosen = best_passing(candidates)
    opted_in = champion.outcome == NOT_COMPARABLE and gate.replace_incomparable
    deploy = chosen is not None and (champion.challenger_deploys or opted_in)
    thresholds = {"min_train_score": gate.min_train_score, "min_test_score": gate.min_test_score,
                  "max_regression": gate.max_regression}
    if gate.max_calibration_error is not None:
        thresholds["max_calibration_error"] = gate.max_calibration_error
    return Decision(deploy, chosen if deploy else None, gate.metric, gate.confidence, thresholds, candidates,
                    comparisons, champion, test_reuse, gate.promote)


def summary_lines(decision: Decision) -> list[str]:
    """The one-screen summary printed at the end of the stage: scores, verdicts, comparisons, why."""
    rule = "-" * 78
    lines = [f"gate metric: {decision.metric}" + (f", decided at {decision.confidence:.0%} confidence"
                                                  if decision.confidence else ""),
             f"{'model':<10} {'train':>8} {'validation':>11} {'test [interval]':>26}  verdict", rule]
    for name, verdict in decision.candidates.items():
        shown = f"{verdict.validation.score:>11.4f}" if verdict.validation else f"{'-':>11}"
        lines.append(f"{name:<10} {verdict.train.score:>8.4f} {shown} {verdict.test.text():>26}  {verdict.verdict}")
        lines.extend(f"{'':<10}   - {reason}" for reason in verdict.reasons)
    for name, verdict in decision.candidates.items():
        if verdict.calibration:
            lines.append(f"calibration: {name} {verdict.calibration.words()}")
    for comparison in decision.comparisons:
        lines.append(f"compared: {comparison_words(comparison)}")
    lines.append(rule)
    lines.extend(f"champion: {reason}" for reason in decision.champion.reasons)
    lines.append("the registry is outside DVC, so this decision is re-made on each dvc repro (stage gate is "
                 "always_changed)")
    if decision.test_reuse:
        lines.append(decision.test_reuse.words())
    lines.append(_deployed_line(decision))
    return lines


def _deployed_line(decision: Decision) -> str:
    champion = decision.champion
    where = f", replacing champion v{champion.version}" if champion.version else ""
    if decision.deploy and not decision.promoted:
        return (f"deployed: nothing, compare only (gate.promote: false): {decision.model} would be promoted{where} "
                "(nothing registered, deploy/ unchanged)")
    if decision.deploy and champion.outcome == RESTORED:
        return f"deployed: {decision.model} -> deploy/, put back from champion v{champion.version} (this same model)"
    if decision.deploy:
        return f"deployed: {decision.model} -> deploy/{where}"
    if champion.outcome == SAME_MODEL:
        return f"deployed: nothing new, champion v{champion.version} is this same model (deploy/ unchanged)"
    if champion.outcome == STAYS:
        return f"deployed: no, champion v{champion.version} stays (deploy/ unchanged)"
    if champion.outcome == UNKNOWN:
        return "deployed: nothing (the champion could not be checked; deploy/ unchanged)"
    if champion.outcome == NOT_COMPARABLE and champion.version:
        return f"deployed: no, champion v{champion.version} stays: it cannot be compared (deploy/ unchanged)"
    if any(verdict.verdict == MISCALIBRATED for verdict in decision.candidates.values()):
        return "deployed: nothing (no model passed both thresholds and max_calibration_error)"
    return "deployed: nothing (no model passed both thresholds)"


def _threshold(split: str, value: Estimate, threshold: float, key: str, gate: GateParams) -> tuple[bool, str]:
    """Whether a score clears a threshold, and the reason in words."""
    if gate.confidence is None:
        passes = at_least(value.score, threshold)
        return passes, f"{split} {gate.metric} {value.score:.4f} {'>=' if passes else '<'} {key} {threshold}"
    if value.interval is None:
        return False, (f"{split} {gate.metric} {value.score:.4f} has no {gate.confidence:.0%} interval (too few "
                       f"images), so it cannot be shown to clear {key} {threshold}")
    passes = at_least(value.interval.low, threshold)
    return passes, (f"{split} {gate.metric} {value.score:.4f}, {gate.confidence:.0%} interval "
                    f"{value.interval.text()}: lower end {'>=' if passes else '<'} {key} {threshold}")


def _level(gate: GateParams) -> float:
    """The confidence of the intervals and comparisons: the deciding one, or the reporting one."""
    return gate.confidence or statistics.REPORTING_CONFIDENCE


def _interval_json(interval: Interval | None) -> dict | None:
    return asdict(interval) if interval else None
