"""Row 5, end to end: ``dvc repro`` on the default data in a fresh copy of the project.

The copy is made by ``bench.project.copy_project`` and then given back the project's real
params.yaml (sklearn digits, the real epochs and model sizes), committed, and reproduced once from
nothing. Per stage: the wall time from DVC's "Running stage" line to the next one (the stage's
interpreter start, imports and DVC's bookkeeping included), and the stage's own "done in N s".
Target: the whole ``dvc repro`` under 4 minutes on this 2-core machine with both models reaching
``deploy`` in metrics/gate.json. The reference of the ratio is that 4-minute budget.

``--quick`` runs the same with fewer images and epochs: a rehearsal, not judged against the target.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, Line, RowResult, git_commit_all, run_timestamped, stage_times
from bench.project import STAGES
from pipeline.model_table import TRAINING_STAGES

BUDGET_S = 240.0
QUICK = {"max_per_class": 40, "epochs": 2}


def real_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def reproduce(params: dict) -> dict:
    """A fresh project copy with ``params``, ``dvc repro`` once, timed stage by stage."""
    from bench.project import copy_project, project_env, stages_run, write_params

    with tempfile.TemporaryDirectory(prefix="bench-repro-") as temporary:
        root = copy_project(Path(temporary) / "project")
        write_params(root, params)
        git_commit_all(root, "bench params")
        env = project_env()
        env.pop("PYTHONPATH", None)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # Warm-up: the libraries every stage loads are read from disk once before anything is timed.
        subprocess.run([sys.executable, "-c", "import tensorflow, keras, mlflow, pandas, sklearn, PIL, dvc.repo"],
                       cwd=root, env=env, capture_output=True, timeout=600, check=False)
        run = run_timestamped(["dvc", "repro"], root, env, timeout=3600)
        if run.returncode != 0:
            raise RuntimeError(f"dvc repro exited {run.returncode}:\n{run.text[-4000:]}")
        ran = stages_run(run.text)
        if ran != list(STAGES):
            raise RuntimeError(f"dvc repro ran {ran}, expected every stage:\n{run.text[-3000:]}")
        metrics = root / "metrics"
        return {
            "total_s": run.wall_s,
            "stages": stage_times(run),
            "gate": json.loads((metrics / "gate.json").read_text()),
            "evaluate": json.loads((metrics / "evaluate.json").read_text()),
            "ingest": json.loads((metrics / "ingest.json").read_text()),
            "train": {stage: json.loads((metrics / f"{stage}.json").read_text())
                      for stage in TRAINING_STAGES},
            "params": params,
            "log": [f"{t:8.2f} {line}" for t, line in run.lines],
        }


def stage_lines(result: dict, row: RowResult, judged: bool, unjudged: str = "(quick: not judged)") -> None:
    """One line per stage and the total against the budget."""
    total = result["total_s"]
    for stage in STAGES:
        times = result["stages"].get(stage, {})
        wall, body = times.get("wall_s"), times.get("body_s")
        extra = ""
        if stage.startswith("train_"):
            summary = result["train"][stage]
            extra = (f", {summary['epochs_run']} epochs x {summary['iterations_per_epoch']} it, "
                     f"{summary.get('precision', '?')}, XLA {'on' if summary.get('jit_compile') else 'off'}")
        measured = f"{wall:.1f} s (body {body:.1f} s{extra})" if wall is not None and body is not None else "-"
        row.lines.append(Line(f"  {stage}", measured,
                              f"{100 * wall / total:.0f} % of total" if wall is not None else "-", None, "-", None,
                              {"wall_s": wall, "body_s": body}))
    ratio = total / BUDGET_S
    row.lines.append(Line("dvc repro total", f"{total:.1f} s", f"{BUDGET_S:.0f} s budget",
                          {"median": ratio, "min": ratio, "max": ratio, "n": 1, "values": [ratio]},
                          f"< {BUDGET_S:.0f} s" if judged else unjudged,
                          total < BUDGET_S if judged else None, {"total_s": total}))


def verdict_lines(result: dict, row: RowResult, judged: bool, unjudged: str = "(quick: not judged)") -> None:
    candidates = result["gate"]["candidates"]
    verdicts = {name: c["verdict"] for name, c in candidates.items()}
    accuracies = ", ".join(f"{name} {result['evaluate'][name]['test']['accuracy']:.3f}" for name in candidates)
    both = all(v == "deploy" for v in verdicts.values()) and len(verdicts) == 2
    row.lines.append(Line("gate verdicts", ", ".join(f"{n} {v}" for n, v in verdicts.items()),
                          f"test acc {accuracies}", None, "both deploy" if judged else unjudged,
                          both if judged else None, {"verdicts": verdicts, "deployed": result["gate"]["model"]}))


def run(mode: str) -> RowResult:
    row = RowResult("e2e", "dvc repro on the default data (sklearn digits), fresh project copy")
    if mode == "tiny":
        row.status = "skipped"
        row.notes.append("skipped: --tiny (a full dvc repro takes minutes; run --quick or the full suite)")
        return row
    params = copy.deepcopy(real_params())
    if mode == "quick":
        params["ingest"]["max_per_class"] = QUICK["max_per_class"]
        for stage in TRAINING_STAGES:
            params[stage]["epochs"] = min(params[stage]["epochs"], QUICK["epochs"])
        row.notes.append(f"--quick: {QUICK['max_per_class']} digits per class and {QUICK['epochs']} epochs per "
                         "model, so the targets are not judged")
    result = reproduce(params)
    stage_lines(result, row, judged=mode == "full")
    verdict_lines(result, row, judged=mode == "full")
    row.notes.append(f"ingest accepted {result['ingest']['accepted']} images in {result['ingest']['classes']} "
                     "classes; stage wall = from DVC's 'Running stage' line to the next (interpreter start, "
                     "imports, DVC hashing included), body = the stage's own 'done in N s'")
    row.data = {key: value for key, value in result.items() if key != "params"}
    row.data["params"] = result["params"]
    return row
