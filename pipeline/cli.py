"""The thin shell every stage's ``main()`` runs in: logging, timing, clean errors."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

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
               parser: argparse.ArgumentParser) -> None:
    """``if __name__ == "__main__"`` helper: run the stage and exit with its code."""
    sys.exit(run_stage(stage, body, parser))
