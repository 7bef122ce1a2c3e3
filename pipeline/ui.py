"""``python -m pipeline.ui``: the address ``make ui`` prints before it starts the MLflow UI.

MLflow 3's UI keeps a GenAI / Model training switch in the browser's local storage and opens on
the GenAI overview, whatever the experiment's kind tag says; the address of the experiment's
training runs (``#/experiments/<id>/runs``) opens the runs table either way. The experiment id is
read from the project's SQLite store directly: importing MLflow would cost seconds before the UI.
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import PipelineError
from pipeline.params import load_params


def experiment_id(store: Path, name: str) -> str | None:
    """The id of the active experiment ``name`` in an MLflow SQLite store, or None (no store, no such
    experiment, or a file that is not one)."""
    if not store.is_file():
        return None
    try:
        with sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True) as connection:
            row = connection.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = "
                                     "'active'", (name,)).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def runs_address(base_url: str, found: str | None) -> str:
    """The training runs view of experiment ``found`` under ``base_url``; the bare address without one."""
    base_url = base_url.rstrip("/")
    return f"{base_url}/#/experiments/{found}/runs" if found else base_url


def port_in_use(url: str) -> bool:
    """Whether something already listens where ``url`` says the UI will: ``mlflow ui`` would then log
    an error and exit 0, and the printed address would open that other program."""
    parsed = urlsplit(url)
    with socket.socket() as probe:
        try:
            probe.bind((parsed.hostname or "127.0.0.1", parsed.port or 80))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="the project's SQLite store")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="where the UI listens")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        name = load_params(args.params).base.experiment_name
    except PipelineError as error:
        print(f"make ui: {error}", file=sys.stderr)
        return 2
    if port_in_use(args.url):
        print(f"make ui: {args.url} is in use (another MLflow UI or server?): stop it, or choose another port, "
              "e.g. make ui UI_PORT=5001", file=sys.stderr)
        return 2
    found = experiment_id(args.store, name)
    if found:
        print(f"MLflow UI: open {runs_address(args.url, found)} (the training runs of {name}); Ctrl-C stops it")
    else:
        print(f"MLflow UI: {args.url} (no runs of {name} in {args.store} yet: run make repro first); Ctrl-C stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
