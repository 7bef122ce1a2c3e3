"""make ui's address: the training runs view of the project's experiment, read from the SQLite store."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from bench.project import free_port
from pipeline import ui


def make_store(path: Path, experiments: list[tuple[int, str, str]]) -> Path:
    """A file with MLflow's experiments table (the columns ui reads): id, name, lifecycle stage."""
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT, "
                           "artifact_location TEXT, lifecycle_stage TEXT)")
        connection.executemany("INSERT INTO experiments (experiment_id, name, lifecycle_stage) VALUES (?, ?, ?)",
                               experiments)
    return path


def test_the_address_is_the_experiments_runs_view(tmp_path: Path) -> None:
    store = make_store(tmp_path / "mlflow.db", [(0, "Default", "active"), (3, "image-classification", "active")])
    found = ui.experiment_id(store, "image-classification")
    assert found == "3"
    assert ui.runs_address("http://127.0.0.1:5000/", found) == "http://127.0.0.1:5000/#/experiments/3/runs"


@pytest.mark.parametrize("experiments", [[], [(4, "image-classification", "deleted")], [(0, "Default", "active")]])
def test_no_live_experiment_gives_the_bare_address(tmp_path: Path, experiments: list) -> None:
    store = make_store(tmp_path / "mlflow.db", experiments)
    assert ui.experiment_id(store, "image-classification") is None
    assert ui.runs_address("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000"


def test_a_missing_or_foreign_store_gives_no_id(tmp_path: Path) -> None:
    assert ui.experiment_id(tmp_path / "absent.db", "image-classification") is None
    (tmp_path / "text.db").write_text("not a database")
    assert ui.experiment_id(tmp_path / "text.db", "image-classification") is None


def test_main_prints_the_runs_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store(tmp_path / "mlflow.db", [(7, "image-classification", "active")])
    url = f"http://127.0.0.1:{free_port()}"
    assert ui.main(["--store", str(store), "--url", url]) == 0
    assert f"{url}/#/experiments/7/runs" in capsys.readouterr().out
    assert ui.main(["--store", str(tmp_path / "none.db"), "--url", url]) == 0
    assert "run make repro first" in capsys.readouterr().out


def test_a_port_already_taken_stops_before_the_ui_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mlflow ui would log the clash, exit 0, and leave the printed address opening the other program."""
    store = make_store(tmp_path / "mlflow.db", [(7, "image-classification", "active")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        assert ui.main(["--store", str(store), "--url", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"make ui: {url} is in use (another MLflow UI or server?): stop it, or choose another "
                            "port, e.g. make ui UI_PORT=5001\n")


def test_a_bad_params_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ui.main(["--params", str(tmp_path / "missing.yaml")]) == 2
    assert "no such params file" in capsys.readouterr().err
