"""Row 9, serving: ``mlflow models serve`` of the champion under a bounded load on loopback.

A tiny project copy is reproduced once (``dvc repro``: digits, one epoch), its champion served with
``mlflow models serve --env-manager local``; then 4 client threads send 500 requests of one real
image each (base64 in ``dataframe_records``, as the README documents) and stop. Reported:
throughput, p50/p99 latency per request, and errors (target: none); then one request of 64 images.
The load generator and the server share the machine's cores, so the figures are a floor.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import statistics
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


def run(mode: str) -> RowResult:
    from bench.common import git_commit_all
    from bench.project import copy_project, free_port
    from bench.project import run as run_in

    row = RowResult("serving", f"mlflow models serve of the champion: {CLIENTS} clients on loopback")
    if mode == "tiny":
        row.status = "skipped"
        row.notes.append("skipped: --tiny (it needs a dvc repro and a served model; the tests check the same "
                         "server with a small load)")
        return row
    total = REQUESTS[mode]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as temporary:
        project = copy_project(Path(temporary) / "project")
        run_in(project, "dvc", "repro")
        git_commit_all(project, "dvc repro")
        image = sorted(p for p in (project / "data/ingest/images").rglob("*") if p.is_file())[0].read_bytes()
        with served_champion(project, free_port()) as url:
            post(url, image_request([image]))  # the first answer builds TensorFlow's graph: not timed
            result = load_test(url, image_request([image]), CLIENTS, total)
            started = time.perf_counter()
            status, answer = post(url, image_request([image] * 64))
            batch_s = time.perf_counter() - started
    row.lines.append(Line(f"{total} requests of 1 image", f"{result.throughput:.1f} requests/s",
                          f"{result.seconds:.1f} s wall", None, "-", None,
                          {"throughput": result.throughput, "seconds": result.seconds}))
    row.lines.append(Line("latency p50 / p99", f"{1000 * result.percentile(0.5):.0f} / "
                          f"{1000 * result.percentile(0.99):.0f} ms",
                          f"mean {1000 * statistics.fmean(result.latencies or [0]):.0f} ms", None, "-", None,
                          {"p50_s": result.percentile(0.5), "p99_s": result.percentile(0.99)}))
    row.lines.append(Line("errors", str(result.errors), result.first_error[:60] or "-", None, "0",
                          result.errors == 0, {"errors": result.errors}))
    answered = status == 200 and len(answer.get("predictions", [])) == 64
    row.lines.append(Line("1 request of 64 images", f"{1000 * batch_s:.0f} ms" if answered else f"HTTP {status}",
                          "-", None, "answered", answered, {"seconds": batch_s, "status": status}))
    row.notes.append("tiny project (digits, 10 per class, one epoch); each request is one base64 PNG in "
                     "dataframe_records; the clients share the machine's cores with the server, so this is a floor")
    row.data = {"clients": CLIENTS, "requests": total, "errors": result.errors, "seconds": result.seconds,
                "latencies_s": list(result.latencies)}
    return row
