"""What every row shares: sizes, the machine, statistics, subprocesses and their memory, results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli import end_process
from pipeline.cpu import cpu_isa, cpuinfo_field, isa_in_use

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
GIB = 1024 ** 3
MIB = 1024 ** 2

# Sizes: "full" is the real benchmark (a quiet machine), "quick" is for development, "tiny" is for
# the smoke test. A row reads its own entries from its own table; these are the shared names.
MODES = ("full", "quick", "tiny")


def cache_dir() -> Path:
    """Where generated data lives between runs (outside the repository): ``$BENCH_CACHE_DIR`` or
    ``~/.cache/image-pipeline-bench``."""
    root = os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "image-pipeline-bench"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- the machine ---------------------------------------------------------------------------------

# Environment settings that change which kernels and vector extensions TensorFlow's math uses.
MATH_SETTINGS = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "XLA_FLAGS")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, the vector and matrix features that matter for bf16, memory, versions."""
    flags = set(cpuinfo_field("flags").split())
    model = platform.processor() or "unknown"
    if model in ("unknown", "", "x86_64"):
        model = cpuinfo_field("model name") or model
    family, cpu_model_number = cpuinfo_field("cpu family") or None, cpuinfo_field("model") or None
    best_isa = cpu_isa()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        found = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        if found:
            model = found.group(1).strip()
        hypervisor = re.search(r"^Hypervisor vendor:\s*(.+)$", lscpu, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        hypervisor = None
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("tensorflow", "keras", "pillow", "numpy", "dvc", "mlflow"):
        versions[package] = _version(package)
    return {
        "cpu_model": model,
        "cpu_family": family,
        "cpu_model_number": cpu_model_number,
        "hypervisor": hypervisor.group(1).strip() if hypervisor else None,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
        "bf16_hardware": bool({"avx512_bf16", "amx_bf16"} & flags),
        # What the math may use of it: less than the CPU has where these settings hold it down
        # (the README's emulation of a CPU without AVX-512 sets all three).
        "isa": best_isa,
        "isa_in_use": isa_in_use(best_isa),
        "math_settings": {name: os.environ[name] for name in MATH_SETTINGS if name in os.environ},
        "gpu": _has_gpu(),
        "memory_bytes": memory,
        "versions": versions,
        "platform": platform.platform(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for the table header."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"
    cpu = info["cpu_model"]
    if info.get("cpu_family"):
        cpu += f" (family {info['cpu_family']} model {info['cpu_model_number']})"
    if info.get("hypervisor"):
        cpu += f" under {info['hypervisor']}"
    memory = f"{info['memory_bytes'] / GIB:.1f} GiB" if info.get("memory_bytes") else "? GiB"
    v = info["versions"]
    in_use = ""
    if info.get("math_settings"):
        settings = ", ".join(f"{name}={value}" for name, value in info["math_settings"].items())
        in_use = f" (in use: {info['isa_in_use']}; {settings})"
    return (f"{cpu}; {info['cores']} cores; AVX-512 {yes(info['avx512f'])}, AVX-512 BF16 "
            f"{yes(info['avx512_bf16'])}, AMX {yes(info['amx_tile'] or info['amx_bf16'])}{in_use}; "
            f"GPU {'yes' if info['gpu'] else 'none'}; {memory}; Python {v['python']}, TensorFlow "
            f"{v['tensorflow']}, Keras {v['keras']}, Pillow {v['pillow']}, DVC {v['dvc']}")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _version(package: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without importing TensorFlow into the driver process."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").exists()


# --- statistics ----------------------------------------------------------------------------------

def stats(values: Sequence[float]) -> dict[str, Any] | None:
    """Median with the spread (min-max) and the count; None for no values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def paired_ratios(measured: Sequence[float], reference: Sequence[float]) -> dict[str, Any] | None:
    """Ratio of each repeat's figure to the same repeat's reference, summarised."""
    return stats([m / r for m, r in zip(measured, reference) if r])


def fmt_number(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def fmt_stats(summary: dict | None, unit: str = "", digits: int | None = None) -> str:
    """``1,234 img/s [1,200-1,250]``; the spread is left out for a single value."""
    if not summary:
        return "-"
    text = fmt_number(summary["median"], digits)
    if summary["n"] > 1:
        text += f" [{fmt_number(summary['min'], digits)}-{fmt_number(summary['max'], digits)}]"
    return f"{text} {unit}".rstrip()


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


# --- results -------------------------------------------------------------------------------------

@dataclass
class Line:
    """One line of the table: a measured figure, its reference, the ratio and the target."""

    case: str
    measured: str
    reference: str = "-"
    ratio: dict | None = None
    target: str = "-"
    ok: bool | None = None            # None: no target, or not judged in this mode
    data: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "MISS", None: "-"}[self.ok]


@dataclass
class RowResult:
    """Everything one row measured, with notes that say how."""

    key: str
    title: str
    status: str = "ok"                # ok | skipped | error
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    seconds: float | None = None
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        result = asdict(self)
        for line, raw in zip(self.lines, result["lines"]):
            raw["verdict"] = line.verdict
        return result


def format_table(rows: Sequence[RowResult], info: dict, mode: str, started: str) -> str:
    """The one table: a header with the machine, then each row's lines and notes."""
    headers = ("row", "case", "measured", "reference", "ratio [min-max]", "target", "ok")
    table: list[tuple[str, ...]] = []
    for number, row in enumerate(rows, start=1):
        label = f"{ROW_NUMBERS.get(row.key, number)} {row.key}"
        if row.status != "ok" and not row.lines:
            table.append((label, row.status, "; ".join(row.notes[:1]) or "-", "", "", "", ""))
            continue
        for index, line in enumerate(row.lines):
            ratio = fmt_stats(line.ratio, digits=2) if line.ratio else "-"
            table.append((label if index == 0 else "", line.case, line.measured, line.reference, ratio,
                          line.target, line.verdict))
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    out = [f"Benchmark ({mode} sizes), started {started}",
           f"Machine: {machine_line(info)}",
           ""]
    out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    out.append("  ".join("-" * w for w in widths))
    for record in table:
        out.append("  ".join(c.ljust(w) for c, w in zip(record, widths)).rstrip())
    notes = [(row, note) for row in rows for note in row.notes]
    if notes:
        out.append("")
        out.append("Notes:")
        for row, note in notes:
            out.append(f"  [{row.key}] {note}")
    return "\n".join(out)


ROW_NUMBERS = {"ingest": 1, "input": 2, "numerics": 3, "orchestration": 4, "e2e": 5, "photos": 6, "recipe": 7,
               "near_duplicates": 8, "serving": 9, "sweep": 10, "utilisation": 11,
               "loop": 12, "batch_norm": 13, "filters": 14}


def default_results_name(mode: str, rows: list[str]) -> str:
    """The results file a bench run writes when no ``--out`` is given: ``results.json`` for every row
    at full sizes (``results-quick.json``, ``results-tiny.json`` at the others); a run of some rows
    adds their names (``results-recipe.json``), so it never replaces a fuller run's file."""
    parts = ["results"] + ([] if mode == "full" else [mode])
    if set(rows) != set(ROW_NUMBERS):
        parts += [row.replace("_", "-") for row in rows]
    return "-".join(parts) + ".json"


def is_development_results(name: str) -> bool:
    """A ``--quick`` or ``--tiny`` run's default results file, which git ignores."""
    return any(name == f"results-{mode}.json" or name.startswith(f"results-{mode}-") for mode in ("quick", "tiny"))


# --- subprocesses --------------------------------------------------------------------------------

def child_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment, the repository importable, TensorFlow quiet, no MLflow
    settings leaking in, and this interpreter's bin first on PATH (``python`` and ``dvc``)."""
    from bench.project import project_env   # bench.project imports this module: imported when called

    env = project_env()
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


@dataclass
class Measured:
    """A finished subprocess: exit code, output, wall time and peak memory."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_tree_rss: int | None        # peak of the sum of RSS over the process and all its descendants
    peak_single_rss: int | None      # the command's own ru_maxrss (its reaped children included)
    max_processes: int

    def check(self, what: str) -> Measured:
        if self.returncode != 0:
            tail = "\n".join((self.stderr or self.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{what} exited {self.returncode}:\n{tail}")
        return self


# Starts argv[2:] as its only child, waits for it with wait4, writes the child's own peak RSS (kB)
# to the file descriptor argv[1] and ends as the child ended. Measured from this small process, the
# figure is the command's alone: a child forked straight from a large parent (pytest or a bench
# row with TensorFlow loaded) is charged the parent's pages it held until exec.
_LAUNCHER = ("import os, signal, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "os.write(int(sys.argv[1]), str(usage.ru_maxrss).encode())\n"
             "code = os.waitstatus_to_exitcode(status)\n"
             "if code < 0:\n"
             "    signal.signal(-code, signal.SIG_DFL)\n"
             "    os.kill(os.getpid(), -code)\n"
             "sys.exit(code)\n")


def run_measured(command: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 3600, sample_every: float = 0.01, sample_tree: bool = True) -> Measured:
    """Run a command and measure its wall time, its own peak RSS and the peak RSS of its process tree.

    The one runner with time and memory that the benchmarks and the tests use. The command runs
    under a small launcher process that reports the command's own ``ru_maxrss`` (see
    ``_LAUNCHER``). A thread samples the RSS of the command and every descendant (psutil) every
    ``sample_every`` seconds and keeps the largest sum. Summed RSS counts pages that forked workers
    share with their parent once per process, so it is an upper bound of the memory actually used.

    Each sample walks ``/proc`` (about 1 ms of CPU), so sampling every 10 ms takes a tenth of a
    core from the command. Where a CPU-bound command's speed is compared with a reference that
    runs unsampled, time it with ``sample_tree=False`` and measure its memory in a separate run.
    """
    import psutil

    report_read, report_write = os.pipe()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report_write), *command], cwd=cwd,
                               env=env or child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, pass_fds=(report_write,), start_new_session=True)
    os.close(report_write)
    peak = {"rss": 0, "procs": 0}
    stop = threading.Event()

    def sample() -> None:
        try:
            launcher = psutil.Process(process.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            total, count = 0, 0
            try:
                members = launcher.children(recursive=True)   # the command's tree, not the launcher
            except psutil.Error:
                members = []
            for member in members:
                try:
                    total += member.memory_info().rss
                    count += 1
                except psutil.Error:
                    pass
            peak["rss"] = max(peak["rss"], total)
            peak["procs"] = max(peak["procs"], count)
            stop.wait(sample_every)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_tree:
        sampler.start()
    outputs: dict[str, bytes] = {}

    def drain(name: str, stream) -> None:
        outputs[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(name, stream), daemon=True)
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=max(0.0, started + timeout - time.perf_counter()))
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        process.wait()
    except BaseException:   # Ctrl-C: the command is in its own session, so it did not get the signal
        _kill_group(process.pid)
        raise
    wall = time.perf_counter() - started
    stop.set()
    if sample_tree:
        sampler.join()
    for reader in readers:
        reader.join(timeout=1.0)
    if any(reader.is_alive() for reader in readers):
        # A descendant left running holds the output pipes open (so its group is still ours): end it.
        _kill_group(process.pid)
        for reader in readers:
            reader.join()
    with os.fdopen(report_read, "rb") as report:
        reported = report.read().decode().strip()
    return Measured(process.returncode, outputs.get("stdout", b"").decode("utf-8", "replace"),
                    outputs.get("stderr", b"").decode("utf-8", "replace"), wall, peak["rss"] or None,
                    int(reported) * 1024 if reported else None, peak["procs"])


def run_worker(module: str, spec: dict, *, timeout: float = 3600, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> dict:
    """``python -m <module> --worker JSON`` in a fresh interpreter; return the JSON it prints.

    Every TensorFlow measurement runs in its own process: global state (the dtype policy, XLA
    caches, thread pools, memory) cannot leak from one configuration into the next. ``env`` adds
    variables to the worker's environment (``ONEDNN_MAX_CPU_ISA``, say).
    """
    measured = run_measured([sys.executable, "-m", module, "--worker", json.dumps(spec)], cwd=cwd or REPO_ROOT,
                            env=child_env(**env) if env else None, timeout=timeout, sample_every=0.25)
    measured.check(f"{module} worker {spec.get('label', '')}")
    for line in reversed(measured.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["process_wall_s"] = measured.wall_s
            result["process_peak_rss"] = measured.peak_tree_rss
            return result
    raise RuntimeError(f"{module} worker printed no result:\n{measured.stdout[-2000:]}\n{measured.stderr[-2000:]}")


def emit_result(result: dict) -> None:
    """What a worker prints as its last line for :func:`run_worker`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_main(body: Callable[[dict], dict]) -> None:
    """``if __name__ == '__main__'`` of a row module that runs workers: ``--worker JSON``. The
    worker ends as a stage does (:func:`pipeline.cli.end_process`), so its process time is a stage's."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        emit_result(body(json.loads(sys.argv[2])))
        end_process(0)
    else:
        print(f"usage: python -m {body.__module__} --worker JSON (run by python -m bench)", file=sys.stderr)
        sys.exit(2)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def random_training_batch(batch: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A fixed batch of random pixels (0-255, float32) and alternating labels of two classes."""
    import numpy as np

    images = np.random.default_rng(0).uniform(0, 255, size=(batch, *shape)).astype("float32")
    return images, (np.arange(batch) % 2).astype("float32")


def training_steps_in_rounds(models: dict[str, Any], images: Any, labels: Any, steps: int, rounds: int,
                             warmup: int = 1) -> dict[str, list[float]]:
    """Compiled Keras models trained side by side in one process on the same batch: ``warmup`` steps
    each out of the timing (the first traces), then ``rounds`` rounds of ``steps`` ``train_on_batch``
    steps each, the models taking turns in one order and then the other; each model's images per
    second per round (the median step of the round)."""
    for model in models.values():
        for _ in range(warmup):
            model.train_on_batch(images, labels)
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for number in range(rounds):
        for name in list(models) if number % 2 == 0 else list(reversed(models)):
            seconds = []
            for _ in range(steps):
                started = time.perf_counter()
                models[name].train_on_batch(images, labels)
                seconds.append(time.perf_counter() - started)
            per_round[name].append(len(images) / statistics.median(seconds))
    return per_round


# --- DVC runs in a project copy ------------------------------------------------------------------

STAGE_DONE = re.compile(r"stage (\w+): done in ([0-9.]+) s")
STAGE_RUNNING = re.compile(r"Running stage '(\w+)'")


@dataclass
class TimedRun:
    """A command whose output lines were timestamped as they arrived."""

    returncode: int
    wall_s: float
    lines: list[tuple[float, str]]

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def run_timestamped(command: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 3600) -> TimedRun:
    """Run a command with stdout and stderr merged, each line stamped with seconds since start. At the
    timeout, or on Ctrl-C, the command and everything it started (dvc's stage processes) are ended."""
    started = time.perf_counter()
    process = subprocess.Popen(list(command), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                               start_new_session=True)
    lines: list[tuple[float, str]] = []
    timer = threading.Timer(timeout, _kill_group, args=(process.pid,))
    timer.start()
    try:
        for raw in process.stdout:
            lines.append((time.perf_counter() - started, raw.rstrip("\n")))
        process.wait()
    except BaseException:
        _kill_group(process.pid)
        raise
    finally:
        timer.cancel()
    return TimedRun(process.returncode, time.perf_counter() - started, lines)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a command started in its own session), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stage_times(run: TimedRun) -> dict[str, dict[str, float | None]]:
    """Per stage: ``wall_s`` from DVC's "Running stage" line to the next one (or the end: the stage
    process with its interpreter start, imports and DVC's bookkeeping) and ``body_s`` from the
    stage's own log line "stage X: done in N s" (the stage's work without start-up)."""
    starts = [(t, m.group(1)) for t, line in run.lines if (m := STAGE_RUNNING.search(line))]
    result: dict[str, dict[str, float | None]] = {}
    for index, (start, stage) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else run.wall_s
        result[stage] = {"wall_s": end - start, "body_s": None}
    for _, line in run.lines:
        match = STAGE_DONE.search(line)
        if match:
            result.setdefault(match.group(1), {"wall_s": None, "body_s": None})["body_s"] = float(match.group(2))
    return result


def git_commit_all(root: Path, message: str) -> None:
    """``git add -A`` and a commit in ``root`` (a new repository when it has none), as a user would."""
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], cwd=root, check=True,
                   capture_output=True)
