"""Command-line flags generated from the config dataclasses: every field of ModelConfig, DataConfig
and TrainConfig is a flag --<field> (names are unique across the three), plus --preset and --run_dir."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from hamjax.nn.model import ModelConfig
from hamjax.train.config import PRESETS, DataConfig, RunConfig, TrainConfig, preset

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _parser_for(annotation):
    """(argparse type, is_bool) for int, float, str, bool and their `| None` forms ("none" -> None)."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if base is bool:
        return None, True
    if not optional:
        return base, False

    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error message
    return parse, False


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, defaulting to "not given" (the preset decides)."""
    parser.add_argument("--preset", default="small", help=f"starting configuration: {', '.join(PRESETS)}")
    parser.add_argument("--run_dir", default=argparse.SUPPRESS, help="run folder (default: runs/<preset>)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind, is_bool = _parser_for(hints[field.name])
            default = f"small: {getattr(getattr(PRESETS['small'], section), field.name)!r}"
            if is_bool:
                group.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=default)
            else:
                group.add_argument(f"--{field.name}", type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                                   help=default)


def config_from_flags(args: argparse.Namespace) -> RunConfig:
    """The preset with the given flags replacing its fields (invalid values raise ValueError)."""
    base = preset(args.preset)
    given = vars(args)
    sections = {
        section: dataclasses.replace(
            getattr(base, section), **{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}
        )
        for section, cls in SECTIONS.items()
    }
    return RunConfig(**sections, run_dir=given.get("run_dir", base.run_dir))
