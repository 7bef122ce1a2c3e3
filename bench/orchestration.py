"""Row 4, orchestration: what DVC costs when there is little or nothing to do.

Set-up (not timed): a copy of the project made by ``bench.project.copy_project`` (tiny params,
10 digits per class) and one full ``dvc repro``.

- no-op ``dvc repro`` (nothing changed) against ``dvc status`` alone: the price of asking DVC
  whether anything is out of date, and of ``repro`` deciding that nothing is.
- a rerun after changing only a gate threshold (``gate.min_test_score``, a new value each
  repeat), against the no-op ``dvc repro``: it must run the gate stage alone, and the gate process
  must not import TensorFlow (the registered champion is the same model, so it needs no scoring). Each Python process started under ``dvc repro`` reports, at exit,
  whether ``tensorflow`` and ``keras`` are in ``sys.modules`` (a ``sitecustomize`` hook put on
  ``PYTHONPATH`` for that run only, in a temporary folder; nothing in the project changes).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.common import Line, RowResult, fmt_stats, paired_ratios, run_timestamped, stage_times, stats

REPEATS = {"full": 5, "quick": 3, "tiny": 3}

HOOK = '''\
"""Benchmark hook: at exit, record which heavy modules this Python process imported."""
import atexit
import os
import sys

_LOG = os.environ.get("BENCH_IMPORT_LOG")

if _LOG:
    def _record():
        import json
        import time
        entry = {"pid": os.getpid(), "argv": sys.argv, "tensorflow": "tensorflow" in sys.modules,
                 "keras": "keras" in sys.modules, "mlflow": "mlflow" in sys.modules,
                 "modules": len(sys.modules), "time": time.time()}
        with open(_LOG, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\\n")
    atexit.register(_record)
'''


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    from bench.project import project_env

    env = project_env()
    env.pop("PYTHONPATH", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra or {})
    return env


def _timed(command: list[str], root: Path, env: dict[str, str]) -> tuple[float, str]:
    run = run_timestamped(command, root, env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {run.returncode}:\n{run.text[-3000:]}")
    return run.wall_s, run.text


def run(mode: str) -> RowResult:
    from bench.project import STAGES, copy_project, read_params, stages_run, write_params

    row = RowResult("orchestration", "no-op dvc repro vs dvc status; a gate-only rerun")
    repeats = REPEATS[mode]
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as temporary:
        temporary = Path(temporary)
        root = copy_project(temporary / "project")
        hook_dir = temporary / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        env = _env()
        setup_s, text = _timed(["dvc", "repro"], root, env)
        if stages_run(text) != list(STAGES):
            raise RuntimeError(f"the set-up dvc repro did not run every stage:\n{text[-3000:]}")
        row.data["setup_repro_s"] = setup_s
        _timed(["dvc", "status"], root, env)                 # warm-up
        _timed(["dvc", "repro"], root, env)
        status_s, noop_s = [], []
        for repeat in range(repeats):
            order = ("status", "repro") if repeat % 2 == 0 else ("repro", "status")
            for what in order:
                seconds, text = _timed(["dvc", what], root, env)
                # Up to date but for the gate, which is always_changed (its champion is in the registry).
                if what == "repro":
                    if stages_run(text) != ["gate"]:
                        raise RuntimeError(f"a no-op dvc repro ran stages {stages_run(text)}:\n{text[-2000:]}")
                    noop_s.append(seconds)
                else:
                    if [line.strip() for line in text.splitlines() if line.strip()][-2:] != ["gate:", "always changed"]:
                        raise RuntimeError(f"dvc status after a full repro is not up to date:\n{text[-2000:]}")
                    status_s.append(seconds)
        ratio = paired_ratios(noop_s, status_s)
        row.lines.append(Line("no-op dvc repro (the gate only)", fmt_stats(stats(noop_s), "s"),
                              fmt_stats(stats(status_s), "s dvc status"), ratio, "-", None,
                              {"noop_repro_s": stats(noop_s), "status_s": stats(status_s)}))

        gate_s, gate_body, imported, ran, gate_noop = [], [], [], [], []
        original = read_params(root)["gate"]["min_test_score"]
        for repeat in range(repeats):
            params = read_params(root)
            params["gate"]["min_test_score"] = round(original + 0.001 * (repeat + 1), 4)
            write_params(root, params)
            log = temporary / f"imports-{repeat}.jsonl"
            log.unlink(missing_ok=True)
            traced_env = _env({"PYTHONPATH": str(hook_dir), "BENCH_IMPORT_LOG": str(log)})
            run = run_timestamped(["dvc", "repro"], root, traced_env, timeout=1800)
            if run.returncode != 0:
                raise RuntimeError(f"dvc repro after a gate change exited {run.returncode}:\n{run.text[-3000:]}")
            gate_s.append(run.wall_s)
            ran.append(stages_run(run.text))
            gate_body.append(stage_times(run).get("gate", {}).get("body_s"))
            entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            gate_processes = [e for e in entries if any(str(a).endswith(("pipeline/gate.py", "pipeline.gate"))
                                                        for a in e["argv"][:1])]
            if not gate_processes:
                raise RuntimeError(f"no gate process reported its imports (hook log: {entries})")
            imported.append({"tensorflow": any(e["tensorflow"] for e in gate_processes),
                             "keras": any(e["keras"] for e in gate_processes),
                             "mlflow": any(e["mlflow"] for e in gate_processes),
                             "modules": max(e["modules"] for e in gate_processes)})
            # The no-op reference right after, in the same state, for a paired ratio.
            seconds, text = _timed(["dvc", "repro"], root, env)
            gate_noop.append(seconds)
        only_gate = all(stages == ["gate"] for stages in ran)
        no_tensorflow = not any(entry["tensorflow"] for entry in imported)
        row.lines.append(Line("gate threshold changed: dvc repro", fmt_stats(stats(gate_s), "s"),
                              fmt_stats(stats(gate_noop), "s no-op repro"), paired_ratios(gate_s, gate_noop), "-",
                              None, {"repro_s": stats(gate_s), "noop_repro_s": stats(gate_noop),
                                     "gate_body_s": stats([b for b in gate_body if b is not None])}))
        row.lines.append(Line("  stages it ran", ", ".join(sorted({s for stages in ran for s in stages})) or "none",
                              "-", None, "gate only", only_gate, {"stages_per_repeat": ran}))
        row.lines.append(Line("  gate process imported TensorFlow",
                              "yes" if not no_tensorflow else
                              f"no (keras {'yes' if any(e['keras'] for e in imported) else 'no'}, "
                              f"mlflow {'yes' if any(e['mlflow'] for e in imported) else 'no'}, "
                              f"{max(e['modules'] for e in imported)} modules)",
                              "-", None, "no", no_tensorflow, {"per_repeat": imported}))
    row.notes.append(f"project copy with tiny params (bench.project.copy_project), fully reproduced once "
                     f"({setup_s:.0f} s, not timed); {repeats} repeats, order alternated; gate change = "
                     "gate.min_test_score +0.001 per repeat; TensorFlow check via a sitecustomize hook "
                     "that logs sys.modules at exit of every Python process under dvc repro")
    return row


if __name__ == "__main__":
    started = time.perf_counter()
    print(run("tiny"))
