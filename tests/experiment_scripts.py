"""Loads a script of experiments/ as a module for the tests, the way `python experiments/<name>.py`
sees its folder: experiments/ on sys.path, so that its sibling experiment_common imports; and runs
its --quick mode."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import types

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name: str) -> types.ModuleType:
    """experiments/<name>.py as the module `<name>_experiment` (registered in sys.modules, where
    dataclasses look their module up)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"{name}_experiment", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_quick(module: types.ModuleType, folder: pathlib.Path, *flags: str) -> tuple[pathlib.Path, dict]:
    """`<script> --quick --output folder/<name>.json [flags]` -> (the results path, the record it wrote)."""
    path = folder / f"{module.__name__.removesuffix('_experiment')}.json"
    module.main(["--quick", "--output", str(path), *flags])
    return path, json.loads(path.read_text())
