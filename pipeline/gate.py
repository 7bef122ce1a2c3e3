"""Stage ``gate``: the deck's decision flow, then the challenger against the registered champion.

For each model, in ``gate.metric`` (accuracy by default): the score on the training set below
``min_train_score`` -> ``underfit`` (it has not learned; go back to the loss and optimizer). Train
passes but test below ``min_test_score`` -> ``overfit`` (it memorised the training data). Both pass
-> ``deploy``. With ``gate.confidence`` set, a threshold passes only if the lower end of the
score's confidence interval clears it.

Among the models that pass, the best test score is the challenger. When the registry already holds
a ``champion``, the gate scores that champion on the same test images and the challenger replaces
it only if it is worse by at most ``max_regression`` (at ``confidence``, when set: the interval of
the difference must lie above ``-max_regression``). A replaced champion's alias moves to a new
version and ``deploy/`` gets the challenger; a champion that stays keeps both. The statistics
(intervals, McNemar test, bootstrap interval of the difference) are in :mod:`pipeline.statistics`.

The stage itself exits 0 so DVC records the decision; ``python -m pipeline.gate --check`` exits 1
when nothing new may be deployed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from pipeline import cli, statistics
from pipeline.artifacts import (
    DEPLOY_INFO_FILE,
    MODEL_FILE,
    DeployedModel,
    RunRecord,
    SplitPredictions,
    read_predictions,
)
from pipeline.errors import PipelineError, first_line
from pipeline.files import atomic_path, read_json, write_json
from pipeline.model_table import MODELS
from pipeline.params import GateParams, Params, load_params
from pipeline.statistics import Interval, PairedComparison

log = logging.getLogger("pipeline.gate")

UNDERFIT, OVERFIT, DEPLOY = "underfit", "overfit", "deploy"

# What became of the registered champion.
NO_CHAMPION = "none"                # the first promotion: nothing to compare with
SAME_MODEL = "same model"           # the challenger is the champion already
NOT_COMPARABLE = "not comparable"   # other classes or input shape, or its files cannot be loaded
UNKNOWN = "unknown"                 # the registry cannot be reached: nothing is deployed
STAYS, REPLACED = "stays", "replaced"
_CHALLENGER_DEPLOYS = (NO_CHAMPION, SAME_MODEL, NOT_COMPARABLE, REPLACED)


@dataclass(frozen=True)
class Estimate:
    """A model's score on one split and, where one was made, its confidence interval."""

    score: float
    interval: Interval | None = None

    def text(self) -> str:
        return f"{self.score:.4f}" + (f" {self.interval.text()}" if self.interval else "")


@dataclass(frozen=True)
class Verdict:
    """One model's scores, its verdict and the reasons for it."""

    train: Estimate
    test: Estimate
    verdict: str
    reasons: list[str]

    def to_json(self) -> dict:
        return {"train_score": self.train.score, "test_score": self.test.score,
                "train_interval": _interval_json(self.train.interval),
                "test_interval": _interval_json(self.test.interval), "verdict": self.verdict,
                "reasons": self.reasons}


@dataclass(frozen=True)
class ChampionCheck:
    """What the gate found in the registry and what it means for the challenger."""

    outcome: str
    version: str | None = None
    model: str | None = None
    comparison: PairedComparison | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def challenger_deploys(self) -> bool:
        return self.outcome in _CHALLENGER_DEPLOYS

    def to_json(self) -> dict:
        compared = self.comparison.to_json() if self.comparison else {}
        return {"outcome": self.outcome, "version": self.version, "model": self.model,
                "stays": self.outcome == STAYS, "challenger": compared.get("first"),
                "score": compared.get("second_score"), "challenger_score": compared.get("first_score"),
                "difference": compared.get("difference"), "difference_interval": compared.get("difference_interval"),
                "p_value": compared.get("mcnemar_p_value"), "table": compared.get("table"), "reasons": self.reasons}


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

    def to_json(self) -> dict:
        return {"deploy": self.deploy, "model": self.model, "metric": self.metric, "confidence": self.confidence,
                "thresholds": self.thresholds,
                "candidates": {name: verdict.to_json() for name, verdict in self.candidates.items()},
                "comparisons": {f"{c.first}_vs_{c.second}": c.to_json() for c in self.comparisons},
                "champion": self.champion.to_json()}


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


def judge_all(predictions: dict[str, dict[str, SplitPredictions]], gate: GateParams,
              seed: int) -> dict[str, Verdict]:
    """Every model's verdict. The test score always carries an interval (at ``gate.confidence``, or
    the reporting level); the train score only when the thresholds are judged at a confidence."""
    test_level = _level(gate)
    return {name: judge(estimate(gate.metric, splits["train"], gate.confidence, seed),
                        estimate(gate.metric, splits["test"], test_level, seed), gate)
            for name, splits in predictions.items()}


def best_passing(candidates: dict[str, Verdict]) -> str | None:
    """The passing model with the best test score; ties go to the first (the smaller custom CNN)."""
    passing = [name for name, verdict in candidates.items() if verdict.verdict == DEPLOY]
    return max(passing, key=lambda name: candidates[name].test.score, default=None)


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
    words = f"challenger {comparison_words(comparison)}"
    if gate.confidence is None:
        replaces = comparison.difference >= -gate.max_regression
        rule = (f"worse by at most max_regression {gate.max_regression:g}" if gate.max_regression
                else "at least as good")
    else:
        low = comparison.difference_interval.low if comparison.difference_interval else None
        replaces = low is not None and low > -gate.max_regression
        rule = f"the {level:.0%} interval of the difference above {-gate.max_regression:g}"
        if not gate.max_regression:
            # "Better beyond doubt" is also what the exact test says: with few images where the two
            # disagree, a bootstrap interval can leave out 0 while McNemar's p is well above 1 - level.
            replaces = replaces and comparison.mcnemar_p_value < 1 - level
            rule += f" and McNemar p < {1 - level:.2g}"
    outcome = REPLACED if replaces else STAYS
    verdict = (f"replaces champion v{champion_version}" if replaces
               else f"champion v{champion_version} stays")
    return ChampionCheck(outcome, champion_version, champion_model, comparison,
                         [f"{words}; needs {rule}: {verdict}"])


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
           gate: GateParams) -> Decision:
    """Put the verdicts and the champion check together: deploy only a passing challenger that the
    champion check lets through."""
    chosen = best_passing(candidates)
    deploy = chosen is not None and champion.challenger_deploys
    thresholds = {"min_train_score": gate.min_train_score, "min_test_score": gate.min_test_score,
                  "max_regression": gate.max_regression}
    return Decision(deploy, chosen if deploy else None, gate.metric, gate.confidence, thresholds, candidates,
                    comparisons, champion)


def deploy_model(model_dir: Path, deploy_dir: Path, model_name: str, run_record: RunRecord) -> None:
    """Copy the chosen model into ``deploy/`` with its description, each file written whole or not at all."""
    with atomic_path(deploy_dir / MODEL_FILE) as staged_model:
        shutil.copyfile(model_dir / MODEL_FILE, staged_model)
        DeployedModel.from_run(model_name, run_record).write(deploy_dir / DEPLOY_INFO_FILE)


def summary_lines(decision: Decision, validation: dict[str, float] | None = None) -> list[str]:
    """The one-screen summary printed at the end of the stage: scores, verdicts, comparisons, why."""
    validation = validation or {}
    rule = "-" * 78
    lines = [f"gate metric: {decision.metric}" + (f", decided at {decision.confidence:.0%} confidence"
                                                  if decision.confidence else ""),
             f"{'model':<10} {'train':>8} {'validation':>11} {'test [interval]':>26}  verdict", rule]
    for name, verdict in decision.candidates.items():
        shown = f"{validation[name]:>11.4f}" if name in validation else f"{'-':>11}"
        lines.append(f"{name:<10} {verdict.train.score:>8.4f} {shown} {verdict.test.text():>26}  {verdict.verdict}")
        lines.extend(f"{'':<10}   - {reason}" for reason in verdict.reasons)
    for comparison in decision.comparisons:
        lines.append(f"compared: {comparison_words(comparison)}")
    lines.append(rule)
    lines.extend(f"champion: {reason}" for reason in decision.champion.reasons)
    lines.append(_deployed_line(decision))
    return lines


def check(gate_file: Path) -> int:
    """Exit status for CI: 0 if the gate allowed deployment, 1 if not."""
    if not gate_file.exists():
        print(f"{gate_file} is missing: run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    decision = read_json(gate_file)
    if decision.get("deploy"):
        print(f"deploy allowed: {decision['model']}")
        return 0
    verdicts = ", ".join(f"{name} {c['verdict']}" for name, c in decision.get("candidates", {}).items())
    champion = decision.get("champion") or {}
    why = f"; champion: {'; '.join(champion['reasons'])}" if champion.get("reasons") else ""
    print(f"deploy NOT allowed: {verdicts}{why}", file=sys.stderr)
    return 1


def main(args: argparse.Namespace) -> None:
    """Judge, compare, decide, deploy, record."""
    params = load_params(args.params)
    gate, seed = params.gate, params.base.seed
    predictions = {spec.name: read_predictions(Path(args.predictions) / f"{spec.name}.csv") for spec in MODELS}
    candidates = judge_all(predictions, gate, seed)
    comparisons = compare_models(predictions, gate, seed)
    model_dirs = {spec.name: Path(args.models) / spec.folder for spec in MODELS}
    run_records = {name: RunRecord.read(path) for name, path in model_dirs.items()}
    registry_reached = _connect(params)
    champion = (_check_champion(best_passing(candidates), predictions, run_records, params, Path(args.ingest))
                if registry_reached else ChampionCheck(UNKNOWN, reasons=[registry_reached.problem]))
    decision = decide(candidates, comparisons, champion, gate)
    deploy_dir = Path(args.deploy)
    deploy_dir.mkdir(parents=True, exist_ok=True)
    if decision.deploy:
        deploy_model(model_dirs[decision.model], deploy_dir, decision.model, run_records[decision.model])
    write_json(Path(args.out), decision.to_json())
    if registry_reached:
        _record_in_mlflow(gate, decision, run_records, deploy_dir)
    validation = {name: statistics.score(gate.metric, np.asarray(splits["validation"].actual),
                                         np.asarray(splits["validation"].predicted))
                  for name, splits in predictions.items() if "validation" in splits}
    for line in summary_lines(decision, validation):
        log.info("%s", line)


@dataclass(frozen=True)
class _RegistryAccess:
    """Whether the registry answered; false with the problem in one line when it did not."""

    problem: str = ""

    def __bool__(self) -> bool:
        return not self.problem


def _connect(params: Params) -> _RegistryAccess:
    from pipeline import tracking

    try:
        tracking.connect(params.base.experiment_name)
    except PipelineError as error:
        return _RegistryAccess(f"the registry cannot be reached, so the champion is unknown and nothing is "
                               f"deployed (deploy/ is left as it was): {error}")
    return _RegistryAccess()


def _check_champion(chosen: str | None, predictions: dict[str, dict[str, SplitPredictions]],
                    run_records: dict[str, RunRecord], params: Params, ingest_dir: Path) -> ChampionCheck:
    """Find the champion in the registry and, when there is a challenger, score it on the same test
    images. Every way this can go wrong ends in a defined outcome with its reason."""
    from pipeline import tracking

    gate = params.gate
    try:
        version = tracking.find_champion(gate.registered_model_name)
    except PipelineError as error:
        return ChampionCheck(UNKNOWN, reasons=[f"{error}; nothing is deployed (deploy/ is left as it was)"])
    if version is None:
        then = ": the passing model is promoted without a comparison" if chosen else ""
        return ChampionCheck(NO_CHAMPION, reasons=[
            f"no {gate.registered_model_name}@{tracking.CHAMPION_ALIAS} in the registry yet{then}"])
    number, tags = str(version.version), version.tags or {}
    champion_model = tags.get("model") or None
    if chosen is None:
        return ChampionCheck(STAYS, number, champion_model, reasons=[
            f"no model passed the thresholds: champion v{number} stays"])
    if tags.get("source.run_id") == run_records[chosen].run_id:
        return ChampionCheck(SAME_MODEL, number, champion_model, reasons=[
            f"champion v{number} is this {chosen} model already (same training run): it stays the champion"])
    try:
        champion_predicted = _champion_answers(version, predictions[chosen]["test"], run_records[chosen],
                                               ingest_dir, params)
    except _NotComparable as why:
        return ChampionCheck(NOT_COMPARABLE, number, champion_model, reasons=[
            f"champion v{number} cannot be compared with {chosen}: {why}; the challenger is judged by the "
            "thresholds alone"])
    return challenge(chosen, predictions[chosen]["test"], number, champion_model or "", champion_predicted,
                     gate, params.base.seed)


class _NotComparable(Exception):
    """Why the champion cannot be scored on this test split."""


def _champion_answers(version, test: SplitPredictions, record: RunRecord, ingest_dir: Path,
                      params: Params) -> list[str]:
    """The champion's predicted class for each test image, from its registered files (not deploy/)."""
    from pipeline import tracking
    from pipeline.manifest import source_root
    from pipeline.serving import read_logged_serving_model

    with tempfile.TemporaryDirectory(prefix="champion-") as folder:
        try:
            model_dir = tracking.download_model_version(params.gate.registered_model_name, str(version.version),
                                                        Path(folder))
            keras_file, info = read_logged_serving_model(model_dir)
        except Exception as error:   # missing or damaged files, a store that went away: one line
            raise _NotComparable(f"its files cannot be loaded ({first_line(error)})") from None
        if sorted(info.class_names) != sorted(record.class_names):
            raise _NotComparable(f"it knows the classes {', '.join(info.class_names)}, this data has "
                                 f"{', '.join(record.class_names)}")
        if (info.image_size, info.channels) != (record.image_size, record.channels):
            raise _NotComparable(f"it takes {info.image_size}x{info.image_size} images with {info.channels} "
                                 f"channel(s), this data is {record.image_size}x{record.image_size} with "
                                 f"{record.channels}")
        import keras

        from pipeline.dataset import load_images
        from pipeline.serving import classify

        try:
            model = keras.models.load_model(keras_file, safe_mode=True)
        except Exception as error:
            raise _NotComparable(f"its model cannot be loaded ({first_line(error)})") from None
    root = source_root(ingest_dir)
    pixels = load_images([str(root / path) for path in test.paths], info.image_size, info.channels)
    log.info("scoring champion v%s on %d test images", version.version, len(pixels))
    return [prediction.label for prediction in classify(model, pixels, info, params.evaluate.batch_size)]


def _deployed_line(decision: Decision) -> str:
    champion = decision.champion
    if decision.deploy:
        where = (f", champion v{champion.version} kept" if champion.outcome == SAME_MODEL
                 else f", replacing champion v{champion.version}" if champion.version else "")
        return f"deployed: {decision.model} -> deploy/{where}"
    if champion.outcome == STAYS:
        return f"deployed: no, champion v{champion.version} stays (deploy/ unchanged)"
    if champion.outcome == UNKNOWN:
        return "deployed: nothing (the registry could not be asked; deploy/ unchanged)"
    return "deployed: nothing (no model passed both thresholds)"


def _threshold(split: str, value: Estimate, threshold: float, key: str, gate: GateParams) -> tuple[bool, str]:
    """Whether a score clears a threshold, and the reason in words."""
    if gate.confidence is None:
        passes = value.score >= threshold
        return passes, f"{split} {gate.metric} {value.score:.4f} {'>=' if passes else '<'} {key} {threshold}"
    if value.interval is None:
        return False, (f"{split} {gate.metric} {value.score:.4f} has no {gate.confidence:.0%} interval (too few "
                       f"images), so it cannot be shown to clear {key} {threshold}")
    passes = value.interval.low >= threshold
    return passes, (f"{split} {gate.metric} {value.score:.4f}, {gate.confidence:.0%} interval "
                    f"{value.interval.text()}: lower end {'>=' if passes else '<'} {key} {threshold}")


def _level(gate: GateParams) -> float:
    """The confidence of the intervals and comparisons: the deciding one, or the reporting one."""
    return gate.confidence or statistics.REPORTING_CONFIDENCE


def _interval_json(interval: Interval | None) -> dict | None:
    return asdict(interval) if interval else None


def _record_in_mlflow(gate: GateParams, decision: Decision, run_records: dict[str, RunRecord],
                      deploy_dir: Path) -> None:
    """Tag each training run with its verdict and the comparison; log the deployed model for
    serving, register it with the reasons and move the alias."""
    import mlflow

    from pipeline import parent_run, tracking

    champion = decision.champion
    for name, verdict in decision.candidates.items():
        with tracking.resume_run(run_records[name].run_id):
            mlflow.set_tags({"gate.verdict": verdict.verdict, "gate.deployed": str(decision.model == name).lower(),
                             "gate.metric": gate.metric})
            if verdict.test.interval:
                mlflow.log_metrics({f"gate_test_{gate.metric}_low": verdict.test.interval.low,
                                    f"gate_test_{gate.metric}_high": verdict.test.interval.high})
            if champion.comparison and champion.comparison.first == name:
                mlflow.set_tags({"gate.champion_version": champion.version or "", "gate.champion": champion.outcome,
                                 "gate.champion_reason": "; ".join(champion.reasons)[:5000]})
                mlflow.log_metrics({"gate_vs_champion_difference": champion.comparison.difference,
                                    "gate_vs_champion_p_value": champion.comparison.mcnemar_p_value})
    if decision.deploy and champion.outcome != SAME_MODEL:
        _register(gate, decision, run_records[decision.model], deploy_dir)
    parent_run.record_decision(decision.to_json(), run_records)


def _register(gate: GateParams, decision: Decision, record: RunRecord, deploy_dir: Path) -> None:
    """Log the deployed model for serving, register it with why it was promoted, move the alias."""
    from pipeline import tracking
    from pipeline.serving import log_serving_model

    chosen, champion = decision.candidates[decision.model], decision.champion
    with tracking.resume_run(record.run_id):
        serving_model = log_serving_model(deploy_dir)
    why = "; ".join([*chosen.reasons, *champion.reasons])
    description = f"Promoted by the gate: {decision.model}, test {gate.metric} {chosen.test.text()}. {why}"
    tags = {"gate.verdict": DEPLOY, "source.run_id": record.run_id, "model": decision.model,
            "gate.metric": gate.metric, "gate.test_score": f"{chosen.test.score:.4f}", "gate.champion": champion.outcome}
    if champion.version:
        tags["gate.replaced_version"] = champion.version
    version = tracking.register_champion(serving_model.model_uri, gate.registered_model_name, tags, description)
    log.info("registered %s version %s with alias %s", gate.registered_model_name, version,
             tracking.CHAMPION_ALIAS)


def _check_main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gate --check")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default="metrics/gate.json")
    args, _ = parser.parse_known_args()
    sys.exit(check(Path(args.out)))


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        _check_main()
    parser = cli.stage_parser("gate", __doc__.splitlines()[0])
    parser.add_argument("--predictions", default="data/predictions", help="evaluate's answers, <model>.csv each")
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder (where the images are)")
    parser.add_argument("--models", default="models", help="folder holding one folder per trained model")
    parser.add_argument("--deploy", default="deploy", help="where the deployed model goes")
    parser.add_argument("--out", default="metrics/gate.json", help="the decision (JSON)")
    cli.main_entry("gate", main, parser)
