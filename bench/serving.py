"""Row 9, serving: ``mlflow models serve`` of the champion against the bare model, on loopback.

For the digits model and for a model of the photo preset's shape, a tiny project copy is reproduced
once (``dvc repro``, one epoch) and, side by side in one run: the bare deployed model is timed on
one decoded image (the floor: what a request costs at the least), then its champion is served with
``mlflow models serve --env-manager local`` and 1, then 4 client threads send 500 requests of one
real image each (base64 in ``dataframe_records``, as the README documents). Reported: p50/p99
latency, throughput, the server's overhead over the floor and errors; for the digits, one request of
64 images too. The load generator and the server share the machine's cores.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import Line, RowResult

CLIENTS = 4
REQUESTS = {"full": 500, "quick": 200}
START_TIMEOUT = 180  # seconds: the server imports TensorFlow and loads the model before it answers


@dataclass(frozen=True)
class LoadResult:
    """What a load test measured: counts, wall time and per-request latencies (seconds, sorted)."""

    requests: int
    errors: int
    seconds: float
    latencies: tuple[float, ...]
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """The latency below which ``fraction`` of the requests finished (nearest rank)."""
        if not self.latencies:
            return float("nan")
        return self.latencies[min(len(self.latencies) - 1, max(0, round(fraction * len(self.latencies)) - 1))]


@contextlib.contextmanager
def served_champion(project: Path, port: int, model_uri: str = "models:/image-classifier@champion",
                    start_timeout: float = START_TIMEOUT) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` from the project's store on 127.0.0.1:``port``;
    yields its URL once ``/ping`` answers, and stops the server's process group on the way out."""
    from bench.project import project_env

    env = project_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    log = tempfile.TemporaryFile()  # the server's output, quoted if it does not start
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def tail() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow models serve exited {server.returncode}:\n{tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow models serve did not answer in {start_timeout:.0f} s:\n{tail()}") \
                        from None
                time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    """POST a JSON body to ``/invocations``; the status and the parsed answer, errors included."""
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"message": text.decode(errors="replace")}


def image_request(images: list[bytes]) -> bytes:
    """The documented request: one ``image`` column of base64 file bytes."""
    return json.dumps({"dataframe_records": [{"image": base64.b64encode(image).decode()}
                                             for image in images]}).encode()


def load_test(url: str, body: bytes, clients: int = CLIENTS, requests: int = 500,
              timeout: float = 60) -> LoadResult:
    """``clients`` threads share ``requests`` POSTs of ``body``, then stop; a request that does not
    answer 200 within ``timeout`` counts as an error."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if next(remaining, None) is None:
                    return
            started = time.perf_counter()
            try:
                status, answer = post(url, body, timeout)
                problem = "" if status == 200 else f"HTTP {status}: {str(answer)[:200]}"
            except OSError as error:
                problem = f"{type(error).__name__}: {error}"
            took = time.perf_counter() - started
            with lock:
                (errors.append(problem) if problem else latencies.append(took))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(requests, len(errors), time.perf_counter() - started, tuple(sorted(latencies)),
                      errors[0] if errors else "")


# Targets on 2 cores, for one digits image: the p50 with one client, the throughput with four (five
# times the 6.6 requests/s measured before requests went through the compiled call), and what the
# server adds to the bare model's p50.
TARGET_P50_S, TARGET_THROUGHPUT, TARGET_OVERHEAD_S = 0.030, 33.0, 0.020
FLOOR_CALLS = {"full": 300, "quick": 100}


def floor_latencies(project: Path, image: bytes, calls: int) -> list[float]:
    """The bare deployed model on the same image's pixels: decoded once, then ``calls`` compiled
    one-image calls (what a request costs at the least), in seconds."""
    import keras

    from pipeline.artifacts import DEPLOY_INFO_FILE, MODEL_FILE, DeployedModel
    from pipeline.images import DEFAULT_MAX_PIXELS, load_pixels_from_bytes
    from pipeline.serving import classify

    model = keras.models.load_model(project / "deploy" / MODEL_FILE, safe_mode=True)
    info = DeployedModel.read(project / "deploy" / DEPLOY_INFO_FILE)
    pixels = load_pixels_from_bytes(image, info.image_size, info.channels, DEFAULT_MAX_PIXELS)[None]
    for _ in range(5):
        classify(model, pixels, info)       # the first calls trace the compiled step: not timed
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        classify(model, pixels, info)
        latencies.append(time.perf_counter() - started)
    return sorted(latencies)


def percentile(latencies: list[float], fraction: float) -> float:
    return LoadResult(len(latencies), 0, 1.0, tuple(sorted(latencies))).percentile(fraction)


def served_params(raw: dict, preset: str | None) -> dict:
    """The tiny project's params with the input and custom CNN of params.yaml (``preset`` None, the
    digits) or of params.yaml with a preset from presets/ applied (``photos``): the architecture and
    image size of the model a user serves, trained for one epoch, since latency depends on the
    model's shape, not on what it learned. ResNet50 does not learn (a rate of 1e-9), so the custom
    CNN is the champion served."""
    import yaml

    from bench.common import REPO_ROOT
    from pipeline.preset import apply_preset, read_preset

    chosen = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    if preset is not None:
        chosen, _ = apply_preset(chosen, read_preset(REPO_ROOT / "presets", preset))
    for key in ("image_size", "channels"):
        raw["base"][key] = chosen["base"][key]
    for key in ("blocks", "batch_norm", "residual", "separable", "pooling", "dense_units"):
        raw["train_custom"][key] = chosen["train_custom"][key]
    raw["train_resnet50"]["learning_rate"] = 1e-9
    return raw


def measure_model(label: str, project: Path, requests: int, floor_calls: int, judge: bool) -> list[Line]:
    """Serve the project's champion and measure it against its bare model, in one run: the floor,
    then one client, then four; the lines of the table."""
    from bench.project import free_port

    image = sorted(p for p in (project / "data/ingest/images").rglob("*") if p.is_file())[0].read_bytes()
    floor = floor_latencies(project, image, floor_calls)
    with served_champion(project, free_port()) as url:
        for _ in range(5):
            post(url, image_request([image]))  # the first answers trace the compiled step: not timed
        one = load_test(url, image_request([image]), 1, requests)
        four = load_test(url, image_request([image]), CLIENTS, requests)
        batch = None
        if judge:
            started = time.perf_counter()
            status, answer = post(url, image_request([image] * 64))
            batch = (time.perf_counter() - started, status == 200 and len(answer.get("predictions", [])) == 64,
                     status)
    floor_p50 = percentile(floor, 0.5)
    overhead = one.percentile(0.5) - floor_p50
    ms = lambda seconds: f"{1000 * seconds:.1f} ms"  # noqa: E731
    lines = [
        Line(f"{label}: bare model, 1 image (floor)", f"p50 {ms(floor_p50)} / p99 {ms(percentile(floor, 0.99))}",
             f"{floor_calls} compiled calls", None, "-", None,
             {"p50_s": floor_p50, "p99_s": percentile(floor, 0.99), "calls": floor_calls}),
        Line(f"{label}: server, 1 client", f"p50 {ms(one.percentile(0.5))} / p99 {ms(one.percentile(0.99))}",
             f"{one.throughput:.1f} requests/s", None, f"p50 < {ms(TARGET_P50_S)}" if judge else "-",
             one.percentile(0.5) < TARGET_P50_S if judge else None,
             {"p50_s": one.percentile(0.5), "p99_s": one.percentile(0.99), "throughput": one.throughput,
              "errors": one.errors}),
        Line(f"{label}: server, {CLIENTS} clients", f"{four.throughput:.1f} requests/s",
             f"p50 {ms(four.percentile(0.5))} / p99 {ms(four.percentile(0.99))}", None,
             f">= {TARGET_THROUGHPUT:.0f} requests/s" if judge else "-",
             four.throughput >= TARGET_THROUGHPUT if judge else None,
             {"p50_s": four.percentile(0.5), "p99_s": four.percentile(0.99), "throughput": four.throughput,
              "errors": four.errors}),
        Line(f"{label}: server overhead (p50 - floor p50)", ms(overhead), "-", None,
             f"< {ms(TARGET_OVERHEAD_S)}" if judge else "-", overhead < TARGET_OVERHEAD_S if judge else None,
             {"overhead_s": overhead}),
        Line(f"{label}: errors", str(one.errors + four.errors), (one.first_error or four.first_error)[:60] or "-",
             None, "0", one.errors + four.errors == 0, {"errors": one.errors + four.errors}),
    ]
    if batch:
        seconds, answered, status = batch
        lines.append(Line(f"{label}: 1 request of 64 images", ms(seconds) if answered else f"HTTP {status}", "-",
                          None, "answered", answered, {"seconds": seconds, "status": status}))
    return lines


def run(mode: str) -> RowResult:
    from bench.common import git_commit_all
    from bench.project import copy_project, read_params, write_params
    from bench.project import run as run_in

    row = RowResult("serving", f"mlflow models serve of the champion against the bare model; 1 and {CLIENTS} "
                               "clients on loopback")
    if mode == "tiny":
        row.status = "skipped"
        row.notes.append("skipped: --tiny (it needs a dvc repro and a served model; the tests check the same "
                         "server with a small load)")
        return row
    requests, floor_calls = REQUESTS[mode], FLOOR_CALLS[mode]
    for label, preset, judge in (("digits", None, True), ("photo preset", "photos", False)):
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as temporary:
            project = copy_project(Path(temporary) / "project")
            write_params(project, served_params(read_params(project), preset))
            run_in(project, "dvc", "repro")
            git_commit_all(project, "dvc repro")
            served = json.loads((project / "deploy/model.json").read_text())["model"]
            row.lines.extend(measure_model(f"{label} ({served})", project, requests, floor_calls, judge))
    row.notes.append("tiny projects (digits, 10 per class, one epoch) whose custom CNN has the architecture and "
                     "image size of params.yaml (32x32 grey) and of presets/photos.yaml (64x64 colour); each request "
                     "is one base64 PNG in dataframe_records, answered by the champion (named in brackets); the "
                     "clients share the machine's cores with the server; the floor is the same model loaded in "
                     "the bench process, one compiled call per image on the decoded pixels")
    row.data = {"clients": CLIENTS, "requests": requests}
    return row
