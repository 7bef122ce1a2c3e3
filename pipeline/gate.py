"""Stage ``gate``: the challenger against the registered champion, then the registry and ``deploy/``.

The decision itself (thresholds, the choice of model, the comparison, the words) is in
:mod:`pipeline.decision`, which needs no MLflow and no files. This module does the I/O around it:
read the predictions, find the champion in the registry and score it on the same test images,
register the challenger and move the alias, put it into ``deploy/``, tag the runs.

The stage itself exits 0 so DVC records the decision; ``python -m pipeline.gate --check`` exits 1
when nothing new may be deployed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


from pipeline import cli
from pipeline.artifacts import (
    DEPLOY_INFO_FILE,
    MODEL_FILE,
    DeployedModel,
    RunRecord,
    SplitPredictions,
    read_predictions,
)
from pipeline.decision import (
    DEPLOY,
    NO_CHAMPION,
    RESTORED,
    SAME_MODEL,
    STAYS,
    UNKNOWN,
    CalibrationNote,
    ChampionCheck,
    Decision,
    SplitReuse,
    best_passing,
    cannot_score,
    challenge,
    compare_models,
    decide,
    judge_all,
    not_comparable,
    restored,
    split_fingerprint,
    summary_lines,
)
from pipeline.errors import PipelineError, first_line
from pipeline.files import read_json, write_json
from pipeline.model_table import MODELS
from pipeline.params import GateParams, Params, load_params

log = logging.getLogger("pipeline.gate")

# Tag of each training run judged by the gate: the fingerprint of the test split it was judged on.
TEST_SPLIT_TAG = "gate.test_split"


# Fault-injection hook, for tests only: PIPELINE_GATE_FAULT=after-register | after-alias | between-renames |
# after-deploy makes the gate SIGKILL itself right after that step of a promotion, to show that the alias and
# deploy/ end up naming the same run (or in a state the next run repairs).
FAULT_VARIABLE = "PIPELINE_GATE_FAULT"


def deploy_model(model_file: Path, info: DeployedModel, deploy_dir: Path) -> None:
    """Put a model file and its description into ``deploy/`` at once, the folder replaced whole
    (how a champion's registered files are put back after a gate was stopped half-way)."""
    swap_in(stage_deployment(model_file, info, deploy_dir), deploy_dir)


def stage_deployment(model_file: Path, info: DeployedModel, deploy_dir: Path) -> Path:
    """A complete new deploy folder (model and description), hidden beside ``deploy_dir``; returns it."""
    deploy_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=deploy_dir.parent, prefix=f".{deploy_dir.name}.staged-"))
    try:
        shutil.copyfile(model_file, staged / MODEL_FILE)
        info.write(staged / DEPLOY_INFO_FILE)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def swap_in(staged: Path, deploy_dir: Path) -> None:
    """Replace ``deploy_dir`` by the staged folder with two renames: it is the old folder or the new
    one, each whole (a kill between the renames leaves it absent, which the next gate run repairs)."""
    old = None
    if deploy_dir.exists():
        old = Path(tempfile.mkdtemp(dir=deploy_dir.parent, prefix=f".{deploy_dir.name}.old-"))
        os.replace(deploy_dir, old)   # onto an empty folder: allowed
    _fault_point("between-renames")
    os.replace(staged, deploy_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def deployed_info(deploy_dir: Path) -> DeployedModel | None:
    """``deploy/model.json``; None when there is none or it cannot be read."""
    try:
        return DeployedModel.read(deploy_dir / DEPLOY_INFO_FILE)
    except Exception:   # missing, half-written by an old pipeline, not JSON: nothing deployed
        return None


def deployed_run_id(deploy_dir: Path) -> str:
    """The training run that ``deploy/model.json`` names; empty when there is none or it cannot be read."""
    info = deployed_info(deploy_dir)
    return info.mlflow_run_id if info else ""


def _holds(deploy_dir: Path, model: str, run_id: str | None = None) -> bool:
    """Whether ``deploy_dir`` holds a model and its ``model.json`` names ``model`` (or no model, as files
    deployed before the name was recorded) trained by ``run_id`` (any run, for decisions written
    before the run was recorded)."""
    info = deployed_info(deploy_dir)
    return (info is not None and (deploy_dir / MODEL_FILE).is_file() and info.model in ("", model)
            and run_id in (None, "", info.mlflow_run_id))


def read_calibration(report_file: Path) -> dict[str, CalibrationNote]:
    """Each model's test calibration and Grad-CAM picture from the evaluate stage's report (none for a
    report written before there were any)."""
    if not report_file.exists():
        return {}
    report, notes = read_json(report_file), {}
    for spec in MODELS:
        measured = (report.get(spec.name) or {}).get("calibration")
        if not measured:
            continue
        try:
            notes[spec.name] = CalibrationNote(float(measured["test"]["ece"]), float(measured["test"]["brier"]),
                                               float(measured.get("temperature", 1.0)),
                                               str(measured.get("pictures", {}).get("gradcam", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PipelineError(f"{report_file}: {spec.name}'s calibration cannot be read ({error!r}): rerun the "
                                "evaluate stage (dvc repro -f evaluate)") from None
    return notes


def check(gate_file: Path, deploy_dir: Path = Path("deploy")) -> int:
    """Exit status for CI: 0 if the gate allowed deployment, 1 if not; 2 when there is no decision, or
    it promoted a model that ``deploy_dir`` does not hold (the decision committed with the project, on
    a clone where the gate has not run: nothing here to deploy)."""
    if not gate_file.exists():
        print(f"{gate_file} is missing: run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    try:
        decision = read_json(gate_file)
        problem = "" if isinstance(decision, dict) else "not a JSON object"
    except (OSError, ValueError) as error:   # a merge conflict in it, a half-written copy
        problem = first_line(error)
    if problem:
        print(f"{gate_file} is not a gate decision ({problem}): run the gate again (dvc repro gate)", file=sys.stderr)
        return 2
    if decision.get("deploy"):
        promoted = decision.get("promoted", True)
        if promoted and not _holds(deploy_dir, decision["model"], decision.get("run_id")):
            print(f"{gate_file} allows deploying {decision['model']}, but {deploy_dir}/ does not hold that model: "
                  "the decision is from another run of the pipeline than this workspace's (a fresh clone, "
                  f"{deploy_dir}/ removed, or an older model left in it); run the pipeline first (dvc repro, "
                  "or dvc pull)", file=sys.stderr)
            return 2
        compare_only = "" if promoted else " (compare only, gate.promote: false: not promoted)"
        print(f"deploy allowed: {decision['model']}{compare_only}")
        return 0
    verdicts = ", ".join(f"{name} {c['verdict']}" for name, c in decision.get("candidates", {}).items())
    champion = decision.get("champion") or {}
    why = f"; champion: {'; '.join(champion['reasons'])}" if champion.get("reasons") else ""
    print(f"deploy NOT allowed: {verdicts}{why}", file=sys.stderr)
    return 1


def main(args: argparse.Namespace) -> None:
    """Judge, compare, decide; register, move the alias, then swap deploy/ in; record."""
    params = load_params(args.params)
    gate, seed = params.gate, params.base.seed
    predictions = {spec.name: read_predictions(Path(args.predictions) / f"{spec.name}.csv") for spec in MODELS}
    candidates = judge_all(predictions, gate, seed, read_calibration(Path(args.report)))
    comparisons = compare_models(predictions, gate, seed)
    model_dirs = {spec.name: Path(args.models) / spec.folder for spec in MODELS}
    run_records = {name: RunRecord.read(path) for name, path in model_dirs.items()}
    deploy_dir = Path(args.deploy)
    _sweep_leftovers(deploy_dir)
    registry_reached = _connect(params)
    # compare only leaves deploy/ as it is, repaired or not
    put_back = bool(registry_reached) and gate.promote and _restore_champion(gate.registered_model_name, deploy_dir)
    chosen = best_passing(candidates)
    champion = (_check_champion(chosen, predictions, run_records, params, Path(args.ingest))
                if registry_reached else ChampionCheck(UNKNOWN, reasons=[registry_reached.problem]))
    if put_back and champion.outcome == SAME_MODEL:
        champion = restored(champion, chosen)
    reuse = _test_reuse(predictions, run_records, gate, registry_reached.experiment_id) if registry_reached else None
    decision = decide(candidates, comparisons, champion, gate, reuse)
    if decision.model:
        decision = dataclasses.replace(decision, run_id=run_records[decision.model].run_id)
    deploy_dir.mkdir(parents=True, exist_ok=True)   # dvc.yaml's output: DVC fails a stage that leaves it absent
    if decision.promoted and champion.outcome != RESTORED:
        info = DeployedModel.from_run(decision.model, run_records[decision.model], params.ingest.max_image_pixels)
        _promote(gate, decision, info, model_dirs[decision.model], deploy_dir)
    write_json(Path(args.out), decision.to_json())
    if registry_reached:
        try:
            _record_in_mlflow(gate, decision, run_records)
        except Exception as error:   # after the decision took effect: say so, in one line
            done = f"{decision.model} is deployed, but " if decision.promoted else ""
            raise PipelineError(f"{done}the decision could not be recorded in the MLflow runs "
                                f"({first_line(error)}); {args.out} holds it. Rerun the gate to record it: "
                                "dvc repro gate") from None
    for line in summary_lines(decision):
        log.info("%s", line)
    log.info("next: make ui (the runs side by side in MLflow), make plots (curves, confusion matrices, mistakes, "
             "Grad-CAM, reliability); "
             "the decision is in %s", args.out)


@dataclass(frozen=True)
class _RegistryAccess:
    """Whether the registry answered; false with the problem in one line when it did not."""

    problem: str = ""
    experiment_id: str = ""

    def __bool__(self) -> bool:
        return not self.problem


def _connect(params: Params) -> _RegistryAccess:
    from pipeline import tracking

    try:
        experiment_id = tracking.connect(params.base.experiment_name)
    except PipelineError as error:
        return _RegistryAccess(f"the registry cannot be reached, so the champion is unknown and nothing is "
                               f"deployed (deploy/ is left as it was): {error}")
    return _RegistryAccess(experiment_id=experiment_id)


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
            f"champion v{number} is this {chosen} model already (same training run): it stays the champion "
            "and nothing new is deployed"])
    try:
        lineage_note = _champion_lineage(version, predictions[chosen]["test"], ingest_dir)
        champion_predicted = _champion_answers(version, predictions[chosen]["test"], run_records[chosen],
                                               ingest_dir, params)
    except _CannotScore as why:
        return cannot_score(number, champion_model, str(why), gate.registered_model_name)
    except _NotComparable as why:
        return not_comparable(chosen, number, champion_model, str(why), gate)
    compared = challenge(chosen, predictions[chosen]["test"], number, champion_model or "", champion_predicted,
                         gate, params.base.seed)
    return dataclasses.replace(compared, reasons=[*compared.reasons, lineage_note]) if lineage_note else compared


class _NotComparable(Exception):
    """The champion was made for other classes or another input shape, or learned from today's test images."""


class _CannotScore(Exception):
    """The champion's files cannot be fetched or loaded (store error, missing or damaged files, timeout)."""


def _champion_lineage(version, test: SplitPredictions, ingest_dir: Path) -> str:
    """Raise :class:`_NotComparable` when the champion learned from some of today's test images (by
    content hash); return a note when its run recorded none, else an empty string."""
    from pipeline import lineage, tracking
    from pipeline.manifest import read_manifest

    run_id = (version.tags or {}).get("source.run_id") or version.run_id
    try:
        seen = tracking.seen_images(run_id) if run_id else None
    except PipelineError as error:
        raise _CannotScore(str(error)) from None
    if seen is None:
        return f"champion v{version.version}: lineage unknown (trained before lineage was recorded)"
    manifest = read_manifest(ingest_dir)
    try:
        today = lineage.hashes_of(test.paths, dict(zip(manifest["path"], manifest["sha256"])))
    except KeyError as missing:
        raise _CannotScore(f"today's test image {missing} is not in {ingest_dir}'s manifest: rerun the "
                           "pipeline (dvc repro)") from None
    shared = lineage.overlap(seen, today)
    if shared:
        # The reason reads "champion vK cannot be compared with <challenger>: it learned from ...".
        raise _NotComparable(f"it learned from {shared} of today's {len(today)} test images (another split or "
                             "changed data): its score on them is biased")
    return ""


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
            raise _CannotScore(f"its files cannot be loaded ({first_line(error)})") from None
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
            raise _CannotScore(f"its model cannot be loaded ({first_line(error)})") from None
    root = source_root(ingest_dir)
    pixels = load_images([str(root / path) for path in test.paths], info.image_size, info.channels)
    log.info("scoring champion v%s on %d test images", version.version, len(pixels))
    return [prediction.label for prediction in classify(model, pixels, info, params.evaluate.batch_size)]


def _record_in_mlflow(gate: GateParams, decision: Decision, run_records: dict[str, RunRecord]) -> None:
    """Tag each training run with its verdict and the comparison; record the decision on its parent run."""
    import mlflow

    from pipeline import parent_run, tracking

    champion = decision.champion
    for name, verdict in decision.candidates.items():
        with tracking.resume_run(run_records[name].run_id):
            deployed = decision.promoted and decision.model == name
            mlflow.set_tags({"gate.verdict": verdict.verdict, "gate.deployed": str(deployed).lower(),
                             "gate.metric": gate.metric})
            if decision.test_reuse:
                mlflow.set_tag(TEST_SPLIT_TAG, decision.test_reuse.split)
            if verdict.test.interval:
                mlflow.log_metrics({f"gate_test_{gate.metric}_low": verdict.test.interval.low,
                                    f"gate_test_{gate.metric}_high": verdict.test.interval.high})
            if champion.comparison and champion.comparison.first == name:
                mlflow.set_tags({"gate.champion_version": champion.version or "", "gate.champion": champion.outcome,
                                 "gate.champion_reason": "; ".join(champion.reasons)[:5000]})
                mlflow.log_metrics({"gate_vs_champion_difference": champion.comparison.difference,
                                    "gate_vs_champion_p_value": champion.test.p_value})
    parent_run.record_decision(decision.to_json(), run_records)


def _test_reuse(predictions: dict[str, dict[str, SplitPredictions]], run_records: dict[str, RunRecord],
                gate: GateParams, experiment_id: str) -> SplitReuse | None:
    """How many training runs of the experiment have been judged on this test split: those tagged
    with its fingerprint by earlier decisions, and these. A store that fails here costs the count only."""
    from mlflow.tracking import MlflowClient

    split = split_fingerprint(next(iter(predictions.values()))["test"])
    try:
        earlier = MlflowClient().search_runs([experiment_id], f"tags.`{TEST_SPLIT_TAG}` = '{split}'",
                                             max_results=50_000)
    except Exception as error:   # the count is a warning, not a reason to fail the decision
        log.warning("could not count the decisions taken on this test split: %s", first_line(error))
        return None
    judged = {run.info.run_id for run in earlier} | {record.run_id for record in run_records.values()}
    return SplitReuse(split, len(judged), gate.max_test_reuse)


def _promote(gate: GateParams, decision: Decision, info: DeployedModel, model_dir: Path, deploy_dir: Path) -> None:
    """Registry first, then deploy/: stage the new deploy folder beside deploy/, log it for serving,
    register it with why it was promoted, move the alias, and only then swap it into deploy/. A kill
    before the alias moves leaves the old champion in both; after, the next run restores deploy/."""
    from pipeline import tracking

    staged = stage_deployment(model_dir / MODEL_FILE, info, deploy_dir)
    try:
        try:
            version = _register(gate, decision, info.mlflow_run_id, staged)
            _fault_point("after-register")
            tracking.move_champion_alias(gate.registered_model_name, version)
        except Exception as error:   # refused (permissions, a name) or the store went away: one line
            raise PipelineError(f"the registry did not take the promotion of {decision.model} to "
                                f"{gate.registered_model_name}@{tracking.CHAMPION_ALIAS} ({first_line(error)}): "
                                "the alias and deploy/ are left as they were") from None
        log.info("%s version %s is the %s", gate.registered_model_name, version, tracking.CHAMPION_ALIAS)
        _fault_point("after-alias")
        swap_in(staged, deploy_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)   # gone already after the swap
    _fault_point("after-deploy")


def _register(gate: GateParams, decision: Decision, run_id: str, staged: Path) -> str:
    """Log the staged deploy folder for serving and register it with why it was promoted."""
    from pipeline import tracking
    from pipeline.serving import log_serving_model

    chosen, champion = decision.candidates[decision.model], decision.champion
    with tracking.resume_run(run_id):
        serving_model = log_serving_model(staged)
    why = "; ".join([*chosen.reasons, *champion.reasons])
    description = f"Promoted by the gate: {decision.model}, test {gate.metric} {chosen.test.text()}. {why}"
    tags = {"gate.verdict": DEPLOY, "source.run_id": run_id, "model": decision.model,
            "gate.metric": gate.metric, "gate.test_score": f"{chosen.test.score:.4f}", "gate.champion": champion.outcome}
    if champion.version:
        tags["gate.replaced_version"] = champion.version
    version = tracking.register_version(serving_model.model_uri, gate.registered_model_name, tags, description)
    log.info("registered %s version %s", gate.registered_model_name, version)
    return version


def _fault_point(step: str) -> None:
    """The fault-injection hook for tests (see :data:`FAULT_VARIABLE`): SIGKILL this process after ``step``."""
    if os.environ.get(FAULT_VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _sweep_leftovers(deploy_dir: Path) -> None:
    """Remove staged or old deploy folders that a killed gate left beside deploy/; a gate killed between
    :func:`swap_in`'s two renames left deploy/ absent and the folder it held aside: put that back first."""
    if not deploy_dir.exists():
        for old in sorted(deploy_dir.parent.glob(f".{deploy_dir.name}.old-*")):
            if (old / DEPLOY_INFO_FILE).exists():
                os.replace(old, deploy_dir)
                log.warning("deploy/ was missing (a gate stopped half-way): put back from %s", old.name)
                break
    for pattern in (f".{deploy_dir.name}.staged-*", f".{deploy_dir.name}.old-*"):
        for leftover in deploy_dir.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _restore_champion(registered_name: str, deploy_dir: Path) -> bool:
    """When the alias names another run than deploy/model.json (a gate killed after moving the alias),
    or deploy/ lacks its model file, put the champion's registered files back into deploy/ before
    deciding anything; whether it did."""
    from pipeline import tracking
    from pipeline.serving import read_logged_serving_model

    try:
        version = tracking.find_champion(registered_name)
    except PipelineError:
        return False   # the champion check says why, and nothing is deployed
    run_id = (version.tags or {}).get("source.run_id", "") if version is not None else ""
    deployed = deployed_run_id(deploy_dir)
    if not run_id or (run_id == deployed and (deploy_dir / MODEL_FILE).is_file()):
        return False
    if run_id == deployed:
        log.warning("deploy/ holds run %s without its model file: restoring deploy/ from %s@%s, version %s",
                    run_id, registered_name, tracking.CHAMPION_ALIAS, version.version)
    else:
        log.warning("deploy/ holds run %s but %s@%s is run %s (a gate stopped half-way): restoring deploy/ from "
                    "version %s", deployed or "(none)", registered_name, tracking.CHAMPION_ALIAS, run_id,
                    version.version)
    with tempfile.TemporaryDirectory(prefix="champion-") as folder:
        try:
            model_dir = tracking.download_model_version(registered_name, str(version.version), Path(folder))
            keras_file, info = read_logged_serving_model(model_dir)
        except Exception as error:   # the champion check meets the same problem and fails closed
            log.warning("deploy/ could not be restored: %s", first_line(error))
            return False
        deploy_model(keras_file, info, deploy_dir)
    return True


def _check_main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gate --check")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default="metrics/gate.json")
    parser.add_argument("--deploy", default="deploy")
    args, _ = parser.parse_known_args()
    sys.exit(check(Path(args.out), Path(args.deploy)))


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        _check_main()
    parser = cli.stage_parser("gate", __doc__.splitlines()[0])
    parser.add_argument("--predictions", default="data/predictions", help="evaluate's answers, <model>.csv each")
    parser.add_argument("--report", default="metrics/evaluate_report.json",
                        help="evaluate's report: each model's calibration and Grad-CAM picture")
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder (where the images are)")
    parser.add_argument("--models", default="models", help="folder holding one folder per trained model")
    parser.add_argument("--deploy", default="deploy", help="where the deployed model goes")
    parser.add_argument("--out", default="metrics/gate.json", help="the decision (JSON)")
    cli.main_entry("gate", main, parser)
