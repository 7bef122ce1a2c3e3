"""Apply a preset: write params.yaml with the few values a preset in presets/ changes.

A preset (``presets/photos.yaml``) holds only the keys that differ from the default params.yaml,
in the same sections. ``python -m pipeline.preset photos`` rewrites params.yaml with those values
(``photos unbalanced`` layers two: the later one's keys win),
line by line, so every comment and the layout stay as they are; the result is validated like any
params file before it replaces the old one atomically, and each changed key is logged with its
old and new value. DVC tracks params.yaml as before, so ``dvc repro`` retrains what changed.

The defaults are params.yaml as committed: ``git checkout params.yaml`` gets them back, and
applying a preset to them always writes the same file. ``--list`` names the presets.
(Not DVC's Hydra composition, ``hydra.enabled`` with ``conf/``: it rebuilds params.yaml only on
``dvc exp run``, drops every comment, and needs hydra-core and a split of params.yaml into conf/.)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.files import atomic_write_text
from pipeline.params import load_params, params_from_dict

log = logging.getLogger("pipeline.preset")

# `  key: value   # comment`: the indent and key, the spaces after the colon, the value, then the
# comment with the spaces before it (a `#` after a space starts a comment in YAML).
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:][^:#]*):(?P<gap> *)(?P<value>.*?)(?P<comment>\s+#.*)?$")


class PresetError(PipelineError):
    """A preset is missing, malformed or names a key params.yaml does not have."""


class Change(NamedTuple):
    """One value a preset changes: the dotted key, the value before and after."""

    key: str
    old: Any
    new: Any


def preset_names(folder: Path) -> list[str]:
    """The presets in ``folder``, sorted: the stems of its ``*.yaml`` files."""
    return sorted(path.stem for path in Path(folder).glob("*.yaml"))


def read_preset(folder: Path, name: str) -> dict:
    """Read preset ``name`` from ``folder`` as a mapping (not yet checked against params.yaml)."""
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        known = preset_names(folder)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known) or 'none'}"
        raise PresetError(f"no preset '{name}' in {folder}/ ({hint})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PresetError(f"{path}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict) or not raw:
        raise PresetError(f"{path}: expected a mapping of params.yaml sections to the values that differ")
    return raw


def apply_preset(params: dict, preset: dict) -> tuple[dict, list[Change]]:
    """Merge ``preset`` into ``params`` section by section; return the merged copy and what changed.

    Raises PresetError naming the first preset key that params.yaml does not have. A value equal to
    the one in ``params`` is kept and is not a change (applying a preset twice changes nothing).
    """
    merged = copy.deepcopy(params)
    changes: list[Change] = []
    _merge(merged, preset, "", changes)
    return merged, changes


def check_preset(defaults: dict, preset: dict) -> None:
    """Raise PresetError naming the first preset key that params.yaml lacks or whose value is the default:
    a preset holds only the differences."""
    _, changes = apply_preset(defaults, preset)
    changed = {change.key for change in changes}
    for key, value in _leaves(preset, ""):
        if key not in changed:
            raise PresetError(f"{key}: {_flow(value)} is the default already; "
                              "a preset holds only the keys that differ from params.yaml")


def rewrite_values(text: str, changes: list[Change]) -> str:
    """params.yaml's ``text`` with each changed value written in place: comments and layout kept,
    the comment column kept where the new value fits."""
    lines = text.splitlines(keepends=True)
    where = _key_lines(lines)
    for change in changes:
        index = where.get(change.key)
        if index is None:
            raise PresetError(f"{change.key}: not found on a line of its own in params.yaml")
        match = _KEY_LINE.match(lines[index].rstrip("\n"))
        assert match is not None  # _key_lines matched it
        head = f"{match['indent']}{match['key']}:{match['gap'] or ' '}{_flow(change.new)}"
        comment = match["comment"]
        if comment:
            column = match.start("comment") + len(comment) - len(comment.lstrip())
            head = head.ljust(column - 1) + " " + comment.lstrip()
        lines[index] = head + ("\n" if lines[index].endswith("\n") else "")
    return "".join(lines)


def _merge(target: dict, preset: dict, where: str, changes: list[Change]) -> None:
    for key, value in preset.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in target:
            close = difflib.get_close_matches(str(key), [str(known) for known in target], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PresetError(f"{dotted}: not a key of params.yaml{hint}")
        if isinstance(target[key], dict):
            if not isinstance(value, dict):
                raise PresetError(f"{dotted}: is a section of params.yaml; give it a mapping of keys to values")
            _merge(target[key], value, dotted, changes)
        elif target[key] != value or isinstance(target[key], bool) != isinstance(value, bool):  # 1 is not true
            changes.append(Change(dotted, target[key], value))
            target[key] = value


def _leaves(tree: dict, where: str) -> list[tuple[str, Any]]:
    leaves = []
    for key, value in tree.items():
        dotted = f"{where}.{key}" if where else str(key)
        leaves.extend(_leaves(value, dotted) if isinstance(value, dict) else [(dotted, value)])
    return leaves


def _key_lines(lines: list[str]) -> dict[str, int]:
    """The line index of each ``key:`` line, by dotted key, following the mapping indentation."""
    found: dict[str, int] = {}
    stack: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        match = _KEY_LINE.match(line.rstrip("\n"))
        if match is None or not line.strip() or line.lstrip().startswith(("#", "-")):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"].strip()))
        found[".".join(key for _, key in stack)] = index
    return found


def _flow(value: Any) -> str:
    """A value as one line of YAML: 64, true, null, [32, 64], data/sources/photos."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def write_preset(params_path: Path, preset: dict, out: Path, name: str = "preset") -> list[Change]:
    """Apply ``preset`` (called ``name`` in messages) to the params file at ``params_path``, validate
    the result, and write it to ``out`` atomically; return what changed."""
    load_params(params_path)   # a missing or broken params file fails here, in one line
    with open(params_path, encoding="utf-8", newline="") as file:   # as written: "\r\n" kept where it is used
        written = file.read()
    text = written.replace("\r\n", "\n")
    try:
        merged, changes = apply_preset(yaml.safe_load(text), preset)
    except PresetError as error:
        raise PresetError(f"preset {name}: {error}") from None
    rewritten = rewrite_values(text, changes)
    try:
        means = yaml.safe_load(rewritten)
    except yaml.YAMLError:   # a value written as a block (a "- item" list under the key) cut in two
        means = None
    if means != merged:   # the line edit must mean exactly the merge
        raise PresetError(f"{params_path}: could not rewrite the values in place; "
                          "is every changed key on a line of its own?")
    params_from_dict(merged, source=f"{params_path} with preset {name}")
    atomic_write_text(out, rewritten.replace("\n", "\r\n") if "\r\n" in written else rewritten)
    return changes


def main(args: argparse.Namespace) -> None:
    folder = Path(args.presets)
    if args.list:
        print("\n".join(preset_names(folder)))
        return
    if not args.names:
        raise PresetError(f"name a preset (known: {', '.join(preset_names(folder)) or 'none'}) or give --list")
    out = Path(args.out or args.params)
    name = " and ".join(args.names)
    changes = write_preset(Path(args.params), layered([read_preset(folder, each) for each in args.names]), out, name)
    for change in changes:
        log.info("%s: %s -> %s", change.key, _flow(change.old), _flow(change.new))
    log.info("preset %s: %d value(s) changed, %s written%s", name, len(changes), out,
             "" if changes else " (it had the preset's values already)")


def layered(presets: list[dict]) -> dict:
    """Several presets as one, in order: a key of a later preset replaces the same key of an earlier one."""
    merged: dict = {}
    for preset in presets:
        _overlay(merged, preset)
    return merged


def _overlay(target: dict, preset: dict) -> None:
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _overlay(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.stage_parser("preset", __doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name",
                        help="the preset to apply, e.g. photos; several are layered in order: photos unbalanced")
    parser.add_argument("--list", action="store_true", help="name the presets and stop")
    parser.add_argument("--presets", default="presets", help="folder of presets (default: presets)")
    parser.add_argument("--out", default=None, help="where to write (default: the --params file, params.yaml)")
    return parser


def run(argv: list[str] | None = None) -> int:
    """The command line, returning its exit code (2 and one line for a user error)."""
    return cli.run_stage("preset", main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(run())
