"""Row 10, sweep: the same queued DVC experiments run by 1, 2 and 3 workers (``dvc queue start -j``).

Set-up (not timed): a tiny project copy (``bench.project.copy_project``: digits, 10 per class, one
epoch) reproduced once and committed, as a user would before a sweep. Then, for each worker count,
N experiments are queued (``dvc exp run --queue -S train_custom.learning_rate=...``), each with a
learning rate no earlier run used: DVC's run cache restores the data stages and ResNet50 but never
the custom CNN, so every experiment does the same work (train the custom CNN, evaluate both models,
run the gate) and none is short-circuited. Timed: from ``dvc queue start -j N`` until the last
experiment's result is in the repository (its git ref under ``refs/exps``), i.e. the queue is empty.
Reported per worker count: the wall time, experiments per minute, the speedup against one worker,
and the peak memory in use on the machine above its level just before the start; then that every
experiment succeeded with one FINISHED ``train_custom`` run of its own in the project's one SQLite
MLflow store, and that no experiment's log mentions a locked database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import Line, RowResult, fmt_bytes, fmt_stats, load_average, paired_ratios, stats

WORKERS = (1, 2, 3)
SIZES = {"full": {"experiments": 4, "repeats": 2}, "quick": {"experiments": 4, "repeats": 1}}
ROUND_TIMEOUT_S = 1800.0
# What SQLite says when concurrent writers collide, however MLflow or SQLAlchemy wrap it.
STORE_ERRORS = re.compile(r"database is locked|database table is locked|OperationalError", re.IGNORECASE)
_NOT_RESULTS = ("refs/exps/celery/", "refs/exps/exec/", "refs/exps/temp/", "refs/exps/apply/", "refs/exps/stash")
_FAILED_STASH = "refs/exps/celery/failed"
_STATUSES = ("Queued", "Running", "Success", "Failed")


@dataclass(frozen=True)
class QueueRun:
    """One ``dvc queue start -j N`` until the queue is empty: its wall time and the memory it took."""

    workers: int
    seconds: float
    peak_memory_bytes: int
    load_before: list[float]         # the load average (1, 5, 15 minutes) at the start
    load_after: list[float]          # and as the last experiment ended


def queue_experiments(project: Path, settings: Sequence[str]) -> None:
    """``dvc exp run --queue -S <setting>`` for each setting: one queued experiment each."""
    from bench.project import run

    for setting in settings:
        run(project, "dvc", "exp", "run", "--queue", "-S", setting)


def queue_status(project: Path) -> dict[str, str]:
    """Each experiment the queue knows, by name, with its status (Queued, Running, Success, Failed)."""
    from bench.project import run

    found = {}
    for line in run(project, "dvc", "queue", "status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] in _STATUSES:
            found[parts[1]] = parts[-1]
    return found


def queue_logs(project: Path, names: Sequence[str]) -> dict[str, str]:
    """``dvc queue logs <name>``: everything each experiment's stages printed."""
    from bench.project import run

    return {name: run(project, "dvc", "queue", "logs", name).stdout for name in names}


def store_errors(text: str) -> list[str]:
    """The lines of a log that say the MLflow store's database refused a write."""
    return [line.strip() for line in text.splitlines() if STORE_ERRORS.search(line)]


def _git_lines(project: Path, *arguments: str) -> list[str]:
    result = subprocess.run(["git", *arguments], cwd=project, capture_output=True, text=True, check=False)
    return result.stdout.split() if result.returncode == 0 else []


def _finished(project: Path) -> int:
    """How many experiments have ended: result refs plus entries of the failed stash (git alone, so
    polling it costs milliseconds, not a DVC start-up on the cores being measured)."""
    results = [ref for ref in _git_lines(project, "for-each-ref", "--format=%(refname)", "refs/exps/")
               if not ref.startswith(_NOT_RESULTS)]
    return len(results) + len(_git_lines(project, "reflog", "show", "--format=%H", _FAILED_STASH))


def run_queue(project: Path, workers: int, timeout: float = ROUND_TIMEOUT_S) -> QueueRun:
    """``dvc queue start -j workers`` and wait until every queued experiment has ended, success or
    failure. The workers stop by themselves a few seconds later (:func:`stop_workers` makes sure)."""
    import psutil

    queued = sum(status == "Queued" for status in queue_status(project).values())
    target = _finished(project) + queued
    baseline, load_before = psutil.virtual_memory(), load_average()
    peak = {"used": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            memory = psutil.virtual_memory()
            peak["used"] = max(peak["used"], baseline.available - memory.available)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    deadline, next_status = started + timeout, started + 30
    try:
        start_workers(project, workers)
        while _finished(project) < target:
            now = time.perf_counter()
            if now > deadline:
                raise RuntimeError(f"dvc queue start -j {workers}: {target - _finished(project)} experiments "
                                   f"still unfinished after {timeout:.0f} s: {queue_status(project)}")
            if now > next_status:      # a worker that died leaves no ref: ask DVC now and then
                next_status = now + 30
                if not {"Queued", "Running"} & set(queue_status(project).values()):
                    break
            time.sleep(0.5)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        sampler.join()
    return QueueRun(workers, seconds, max(0, peak["used"]), load_before, load_average())


def start_workers(project: Path, workers: int) -> None:
    """``dvc queue start -j workers``, returning as soon as it has spawned them. Its output goes to a
    file, not a pipe: each worker is watched by a process forked from it that keeps its stdout and
    stderr open until the worker exits, so a pipe would keep this call waiting for the last worker."""
    from bench.project import project_env

    log = _celery_folder(project).parent / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        result = subprocess.run(["dvc", "queue", "start", "-j", str(workers)], cwd=project, env=project_env(),
                                stdout=output, stderr=subprocess.STDOUT, timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"dvc queue start -j {workers} exited {result.returncode}\n{log.read_text()}")


def live_workers(project: Path) -> dict[str, int]:
    """DVC's queue workers of this project still running, by name (``dvc-exp-worker-N``), with their
    process ids, from the process files DVC keeps for them."""
    import psutil

    alive = {}
    for info in sorted(_celery_folder(project).glob("dvc-exp-worker-*.json")):
        try:
            pid = json.loads(info.read_text())["pid"]
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and "queue-worker" in " ".join(process.cmdline()):
                alive[info.stem] = pid
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
    return alive


def stop_workers(project: Path, grace: float = 60) -> list[str]:
    """Wait until DVC's queue workers have stopped by themselves (they do 10 s after the queue
    empties), and stop any still running after ``grace`` seconds: SIGTERM by process id (celery's
    warm shutdown), SIGKILL 20 s later. DVC's own shutdown can fail: a worker whose monitor thread
    died (seen once here, of a JSONDecodeError) idles forever. Returns the workers that had to be
    stopped."""
    deadline = time.monotonic() + grace
    while live_workers(project) and time.monotonic() < deadline:
        time.sleep(0.5)
    stuck = live_workers(project)
    for sent in (signal.SIGTERM, signal.SIGKILL):
        for pid in live_workers(project).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sent)
        deadline = time.monotonic() + 20
        while live_workers(project) and time.monotonic() < deadline:
            time.sleep(0.2)
    return sorted(stuck)


def _celery_folder(project: Path) -> Path:
    return project / ".dvc" / "tmp" / "exps" / "celery"


def learning_rates(first: int, count: int) -> list[str]:
    """``count`` settings of the custom CNN's learning rate, numbered from ``first``, none of them the
    project's own (0.001), so each trains anew at the same cost."""
    return [f"train_custom.learning_rate={0.0005 + 0.00001 * (first + i):.5f}" for i in range(count)]


def trained_runs(project: Path, names: Sequence[str]) -> dict[str, list]:
    """Each experiment's ``train_custom`` runs in the project's store (tag ``dvc.experiment``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id], "tags.`dvc.stage` = 'train_custom'", max_results=5000)
    return {name: [r for r in runs if r.data.tags.get("dvc.experiment") == name] for name in names}


def run(mode: str) -> RowResult:
    from bench.common import git_commit_all
    from bench.project import copy_project
    from bench.project import run as run_in

    row = RowResult("sweep", "queued DVC experiments on 1, 2 and 3 workers (dvc queue start -j)")
    if mode == "tiny":
        row.status = "skipped"
        row.notes.append("skipped: --tiny (a dvc repro, then three rounds of queued experiments: minutes; "
                         "tests/test_sweep.py checks the same queue on 2 workers)")
        return row
    count, repeats = SIZES[mode]["experiments"], SIZES[mode]["repeats"]
    seconds: dict[int, list[float]] = {workers: [] for workers in WORKERS}
    memory: dict[int, list[int]] = {workers: [] for workers in WORKERS}
    loads: dict[int, list[dict]] = {workers: [] for workers in WORKERS}
    problems: list[str] = []
    runs_ok = experiments = 0
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as temporary:
        project = copy_project(Path(temporary) / "project")
        run_in(project, "dvc", "repro")
        git_commit_all(project, "dvc repro")
        first = 1
        for repeat in range(repeats):
            for workers in (WORKERS if repeat % 2 == 0 else tuple(reversed(WORKERS))):
                before = set(queue_status(project))
                queue_experiments(project, learning_rates(first, count))
                first += count
                result = run_queue(project, workers)
                stuck = stop_workers(project)         # not timed: the next round starts with none
                row.notes += [f"-j {workers}: DVC's {name} did not stop by itself once the queue was empty; "
                              f"stopped" for name in stuck]
                seconds[workers].append(result.seconds)
                memory[workers].append(result.peak_memory_bytes)
                loads[workers].append({"before": result.load_before, "after": result.load_after})
                statuses = {name: status for name, status in queue_status(project).items() if name not in before}
                experiments += len(statuses)
                problems += [f"-j {workers}: {name} {status}" for name, status in statuses.items()
                             if status != "Success"]
                for name, log in queue_logs(project, sorted(statuses)).items():
                    problems += [f"-j {workers}: {name}: {line[:120]}" for line in store_errors(log)]
                for name, found in trained_runs(project, sorted(statuses)).items():
                    if len(found) == 1 and found[0].info.status == "FINISHED":
                        runs_ok += 1
                    else:
                        problems.append(f"-j {workers}: {name}: train_custom runs {[r.info.status for r in found]}")
    reference = seconds[WORKERS[0]]
    for workers in WORKERS:
        rates = [60 * count / s for s in seconds[workers]]
        speedup = paired_ratios(reference, seconds[workers]) if workers != WORKERS[0] else None
        row.lines.append(Line(f"{count} experiments, -j {workers}", fmt_stats(stats(rates), "exp/min"),
                              f"{fmt_stats(stats(seconds[workers]), 's', 0)} wall, peak "
                              f"{fmt_bytes(max(memory[workers]))} memory", speedup, "-", None,
                              {"workers": workers, "experiments": count, "seconds": stats(seconds[workers]),
                               "experiments_per_minute": stats(rates), "speedup_vs_1": speedup,
                               "peak_memory_bytes": memory[workers], "load_average": loads[workers]}))
    row.lines.append(Line("failed experiments, store errors", str(len(problems)), f"{runs_ok}/{experiments} "
                          "experiments with one FINISHED train_custom run", None, "0", not problems,
                          {"problems": problems}))
    best = min(WORKERS, key=lambda workers: stats(seconds[workers])["median"])
    row.notes.append(f"tiny project copy (digits, 10 per class, one epoch), reproduced once (not timed); per "
                     f"round {count} experiments queued with fresh train_custom.learning_rate values (ResNet50 "
                     f"and the data stages from DVC's run cache); timed from dvc queue start until the last "
                     f"result ref; {repeats} round(s) per worker count; ratio = speedup against -j 1; fastest "
                     f"here: -j {best}")
    row.data = {"experiments": count, "repeats": repeats, "seconds": {str(k): v for k, v in seconds.items()},
                "problems": problems}
    return row


if __name__ == "__main__":
    print(run("quick"))
