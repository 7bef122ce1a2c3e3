"""The thin shell every stage's ``main()`` runs in: logging, timing, clean errors."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

EXIT_USER_ERROR = 2


def configure_logging(verbose: bool = False) -> None:
    """Send the pipeline's log lines to stderr in one short format."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Third-party chatter (alembic migrations, MLflow internals) stays at warnings.
    for noisy in ("alembic", "mlflow", "urllib3", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage shares."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run_stage(stage: str, body: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
              argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one stage body, and turn user errors into one line and exit code 2."""
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    started = time.perf_counter()
    log.info("stage %s: started", stage)
    try:
        body(args)
    except PipelineError as error:
        log.error("stage %s failed: %s", stage, error)
        return EXIT_USER_ERROR
    log.info("stage %s: done in %.1f s", stage, time.perf_counter() - started)
    return 0


def main_entry(stage: str, body: Callable[[argparse.Namespace], None],
               parser: argparse.ArgumentParser) -> NoReturn:
    """``if __name__ == "__main__"`` helper: run the stage and end the process with its code."""
    end_process(run_stage(stage, body, parser))


def end_process(code: int) -> NoReturn:
    """End the process with ``code`` as ``sys.exit`` would, without the interpreter's teardown.

    Once TensorFlow, Keras and MLflow are loaded, freeing every module's objects one by one takes
    about 2.5 s of a stage's process on 2 cores (a tenth of a tiny ``dvc repro``) and frees nothing
    the operating system would not. So when no other thread is still running, the exit handlers
    that libraries registered run (logging's flush, MLflow's end of a run left open,
    multiprocessing's clean-up), stdout and stderr are flushed, and the process ends there. Every
    file a stage writes is closed (and renamed into place) before its body returns. Where a
    non-daemon thread is alive (a thread pool, an upload), the interpreter's own exit runs instead:
    it stops pools and waits for threads in the order their libraries expect; so it does under a
    profiler or a debugger (``python -m cProfile`` writes its file after the module returns).
    """
    main_thread = threading.main_thread()
    if any(thread is not main_thread and not thread.daemon for thread in threading.enumerate()) \
            or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter itself calls at exit; atexit has no public name for it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream or a reader gone: nothing left to flush to
            stream.flush()
    os._exit(code)
