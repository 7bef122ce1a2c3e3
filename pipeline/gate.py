"""Stage ``gate``: the deck's decision flow, then deployment of the best model that passes.

For each model: accuracy on the training set below ``min_train_accuracy`` -> ``underfit`` (it has
not learned; go back to the loss and optimizer). Train passes but test below
``min_test_accuracy`` -> ``overfit`` (it memorised the training data). Both pass -> ``deploy``.
Among the models that pass, the one with the best test accuracy is copied to ``deploy/`` and
registered in MLflow with the alias ``champion``. The stage itself always exits 0 so DVC records
the decision; ``python -m pipeline.gate --check`` exits 1 when nothing may be deployed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import cli
from pipeline.artifacts import DEPLOY_INFO_FILE, MODEL_FILE, DeployedModel, RunRecord
from pipeline.files import atomic_path, read_json, write_json
from pipeline.model_table import MODELS
from pipeline.params import BaseParams, GateParams, load_params

log = logging.getLogger("pipeline.gate")

UNDERFIT, OVERFIT, DEPLOY = "underfit", "overfit", "deploy"


@dataclass(frozen=True)
class Verdict:
    """One model's scores, its verdict and the reasons for it."""

    train_accuracy: float
    test_accuracy: float
    verdict: str
    reasons: list[str]


@dataclass(frozen=True)
class Decision:
    """What the gate decided: whether to deploy, which model, and every candidate's verdict."""

    deploy: bool
    model: str | None
    thresholds: dict
    candidates: dict[str, Verdict]

    def to_json(self) -> dict:
        return {"deploy": self.deploy, "model": self.model, "thresholds": self.thresholds,
                "candidates": {name: asdict(verdict) for name, verdict in self.candidates.items()}}


def judge(train_accuracy: float, test_accuracy: float, gate: GateParams) -> Verdict:
    """The flowchart for one model: train threshold first, then test threshold."""
    if train_accuracy < gate.min_train_accuracy:
        return Verdict(train_accuracy, test_accuracy, UNDERFIT, [
            f"train accuracy {train_accuracy:.4f} < min_train_accuracy {gate.min_train_accuracy}: "
            "the model has not learned the training set (revisit the loss, optimizer, epochs)"])
    passed_train = f"train accuracy {train_accuracy:.4f} >= min_train_accuracy {gate.min_train_accuracy}"
    if test_accuracy < gate.min_test_accuracy:
        return Verdict(train_accuracy, test_accuracy, OVERFIT, [passed_train, (
            f"test accuracy {test_accuracy:.4f} < min_test_accuracy {gate.min_test_accuracy}: "
            "it does well on data it has seen but not on new data (more data, augmentation, regularisation)")])
    return Verdict(train_accuracy, test_accuracy, DEPLOY, [
        passed_train, f"test accuracy {test_accuracy:.4f} >= min_test_accuracy {gate.min_test_accuracy}"])


def decide(scores: dict[str, dict], gate: GateParams) -> Decision:
    """Judge every model in ``evaluate``'s metrics and pick the best test accuracy among those that pass."""
    candidates = {name: judge(split["train"]["accuracy"], split["test"]["accuracy"], gate)
                  for name, split in scores.items()}
    passing = [name for name, verdict in candidates.items() if verdict.verdict == DEPLOY]
    # Ties go to the first model in evaluate's order (the smaller custom CNN).
    chosen = max(passing, key=lambda name: candidates[name].test_accuracy, default=None)
    thresholds = {"min_train_accuracy": gate.min_train_accuracy, "min_test_accuracy": gate.min_test_accuracy}
    return Decision(chosen is not None, chosen, thresholds, candidates)


def deploy_model(model_dir: Path, deploy_dir: Path, model_name: str, run_record: RunRecord) -> None:
    """Copy the chosen model into ``deploy/`` with its description, each file written whole or not at all."""
    with atomic_path(deploy_dir / MODEL_FILE) as staged_model:
        shutil.copyfile(model_dir / MODEL_FILE, staged_model)
        DeployedModel.from_run(model_name, run_record).write(deploy_dir / DEPLOY_INFO_FILE)


def summary_lines(decision: Decision, scores: dict[str, dict] | None = None) -> list[str]:
    """The one-screen summary printed at the end of the stage: accuracy per split, verdict and why."""
    scores = scores or {}
    rule = "-" * 60
    lines = [f"{'model':<10} {'train':>8} {'validation':>11} {'test':>8}  verdict", rule]
    for name, verdict in decision.candidates.items():
        validation = scores.get(name, {}).get("validation", {}).get("accuracy")
        shown = f"{validation:>11.4f}" if validation is not None else f"{'-':>11}"
        lines.append(f"{name:<10} {verdict.train_accuracy:>8.4f} {shown} {verdict.test_accuracy:>8.4f}  "
                     f"{verdict.verdict}")
        lines.extend(f"{'':<10}   - {reason}" for reason in verdict.reasons)
    lines.append(rule)
    lines.append(f"deployed: {decision.model} -> deploy/" if decision.deploy
                 else "deployed: nothing (no model passed both thresholds)")
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
    print(f"deploy NOT allowed: {verdicts}", file=sys.stderr)
    return 1


def main(args: argparse.Namespace) -> None:
    """Decide, deploy, record."""
    params = load_params(args.params)
    scores = read_json(Path(args.scores))
    decision = decide(scores, params.gate)
    deploy_dir = Path(args.deploy)
    deploy_dir.mkdir(parents=True, exist_ok=True)
    model_dirs = {spec.name: Path(args.models) / spec.folder for spec in MODELS}
    run_records = {name: RunRecord.read(path) for name, path in model_dirs.items() if name in scores}
    if decision.deploy:
        deploy_model(model_dirs[decision.model], deploy_dir, decision.model, run_records[decision.model])
    write_json(Path(args.out), decision.to_json())
    _record_in_mlflow(params.base, params.gate, decision, run_records, deploy_dir)
    for line in summary_lines(decision, scores):
        log.info("%s", line)


def _record_in_mlflow(base: BaseParams, gate: GateParams, decision: Decision, run_records: dict[str, RunRecord],
                      deploy_dir: Path) -> None:
    """Tag each training run with its verdict; log the deployed model for serving, register and alias it."""
    import mlflow

    from pipeline import parent_run, tracking
    from pipeline.serving import log_serving_model

    tracking.connect(base.experiment_name)
    for name, verdict in decision.candidates.items():
        with tracking.resume_run(run_records[name].run_id):
            mlflow.set_tags({"gate.verdict": verdict.verdict, "gate.deployed": str(decision.model == name).lower()})
    if decision.deploy:
        record = run_records[decision.model]
        with tracking.resume_run(record.run_id):
            serving_model = log_serving_model(deploy_dir)
        version = tracking.register_champion(serving_model.model_uri, gate.registered_model_name,
                                             {"gate.verdict": DEPLOY, "source.run_id": record.run_id})
        log.info("registered %s version %s with alias %s", gate.registered_model_name, version,
                 tracking.CHAMPION_ALIAS)
    parent_run.record_decision(decision.to_json(), run_records)


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
    parser.add_argument("--scores", default="metrics/evaluate.json", help="evaluate's headline metrics")
    parser.add_argument("--models", default="models", help="folder holding one folder per trained model")
    parser.add_argument("--deploy", default="deploy", help="where the deployed model goes")
    parser.add_argument("--out", default="metrics/gate.json", help="the decision (JSON)")
    cli.main_entry("gate", main, parser)
