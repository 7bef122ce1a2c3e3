"""The MLflow screenshots of the README and docs/walkthrough.md: the runs table (at the address
``make ui`` prints), the compare view and the registered model, taken with headless Chromium from
the MLflow UI over a project's store (what ``make ui`` serves).

    python -m docs.screenshots --store mlflow.db --out docs/images

Needs Chromium (``apt-get install chromium``); the pictures are shrunk to a few tens of KB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

from bench.project import free_port
from pipeline.ui import runs_address

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
EXPERIMENT = "image-classification"
REGISTERED_MODEL = "image-classifier"
WINDOW_WIDTH = 1400
PAGE_HEIGHTS = {"mlflow-runs": 460, "mlflow-compare": 1600, "mlflow-model": 400}   # what each picture shows
KEEP_WIDTH = 1035      # of the window's 1400 pixels: the page, not the assistant panel on its right
WIDTH = 800            # pixels of the saved picture
COLOURS = 64           # a palette PNG: small files for the repository


def start_ui(store: Path, port: int) -> subprocess.Popen:
    """``mlflow ui`` as ``make ui`` starts it, on ``port``; returns once it answers."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{store.resolve()}", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("mlflow ui did not start")
            time.sleep(1)


def api(port: int, path: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def pages(port: int) -> dict[str, str]:
    """The UI addresses to photograph: the runs table, two model runs of one execution compared, the
    registered model."""
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    experiment_id = api(port, f"experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    runs = api(port, "runs/search", {"experiment_ids": [experiment_id], "max_results": 200,
                                     "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    tags = [{tag["key"]: tag["value"] for tag in run["data"].get("tags", [])} for run in runs]
    parents = [run["info"]["run_id"] for run, tag in zip(runs, tags) if "pipeline.key" in tag]
    children = {parent: [run["info"]["run_id"] for run, tag in zip(runs, tags) if tag.get("mlflow.parentRunId") == parent]
                for parent in parents}
    # The newest execution that trained both models (an experiment may have retrained only one).
    pair = next(ids for ids in children.values() if len(ids) >= 2)
    base = f"http://127.0.0.1:{port}/#"
    compare = urllib.parse.urlencode({"runs": json.dumps(pair), "experiments": json.dumps([experiment_id])})
    return {"mlflow-runs": runs_address(f"http://127.0.0.1:{port}", experiment_id),
            "mlflow-compare": f"{base}/compare-runs?{compare}",
            "mlflow-model": f"{base}/models/{REGISTERED_MODEL}"}


def screenshot(browser: str, url: str, out: Path, height: int) -> None:
    """One page in headless Chromium, the assistant panel cut off, shrunk to a palette PNG."""
    from PIL import Image

    raw = out.with_suffix(".raw.png")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", f"--window-size={WINDOW_WIDTH},{height}", "--virtual-time-budget=20000",
                    f"--screenshot={raw}", url], check=True, capture_output=True, timeout=180)
    with Image.open(raw) as image:
        page = image.convert("RGB").crop((0, 0, KEEP_WIDTH, image.height))
        small = page.resize((WIDTH, round(page.height * WIDTH / page.width)), Image.LANCZOS).quantize(COLOURS)
        buffer = BytesIO()
        small.save(buffer, format="PNG", optimize=True)
    raw.unlink()
    out.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="the project's SQLite store")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="where the PNGs go")
    args = parser.parse_args()
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        raise SystemExit("no Chromium on PATH: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_ui(args.store, port)
    try:
        for name, url in pages(port).items():
            screenshot(browser, url, args.out / f"{name}.png", PAGE_HEIGHTS[name])
            print(f"{args.out / name}.png  {(args.out / f'{name}.png').stat().st_size // 1024} KB  {url}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
