"""Command-line flags derived from ``DecodingOptions``: one flag per field, its name, type
and default from the field, its help from the class docstring (``serve ask`` and
``serve evaluate`` share them, as ``python -m training`` derives its flags from
``TrainConfig``)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import fields

from serve.runtime.options import DecodingOptions, option_help

# Shorter names kept from before the flags were derived (the README uses them).
ALIASES = {
    "sampling_temperature": ("--temperature",),
    "sampling_topk": ("--top-k",),
    "sampling_topp": ("--top-p",),
}
_METAVARS = {int: "N", float: "X", str: "WORD"}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(annotation) -> tuple[type, bool]:
    """(the flag's value type, whether it takes several values) of a field's type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return typing.get_args(annotation)[0], True
    if origin in (typing.Union, types.UnionType):  # ``int | None``: an int, or the default
        return next(a for a in typing.get_args(annotation) if a is not type(None)), False
    return annotation, False


def add_decoding_flags(
    parser: argparse.ArgumentParser,
    *,
    defaults: Mapping[str, object] | None = None,
    exclude: Iterable[str] = (),
) -> argparse._ArgumentGroup:
    """One flag per ``DecodingOptions`` field (but ``exclude``), in their own group;
    ``defaults`` replaces the fields' defaults for this command. A tuple field's flag is
    given once per value (``--suppress-words 笨 --suppress-words 傻``)."""
    defaults = dict(defaults or {})
    excluded = set(exclude)
    hints = typing.get_type_hints(DecodingOptions)
    group = parser.add_argument_group("decoding options (serve.runtime.options.DecodingOptions)")
    for f in fields(DecodingOptions):
        if f.name in excluded:
            continue
        kind, several = _kind(hints[f.name])
        names = (flag_name(f.name), *ALIASES.get(f.name, ()))
        default = defaults.get(f.name, f.default)
        common = {"dest": f.name, "help": option_help(f.name)}
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, default=default,
                               **common)
        elif several:  # once per value, like python -m training's --corpus
            group.add_argument(*names, action="append", type=kind, default=list(default),
                               metavar=_METAVARS.get(kind, "VALUE"), **common)
        else:
            group.add_argument(*names, type=kind, default=default,
                               metavar=_METAVARS.get(kind, "VALUE"), **common)
    return group


def decoding_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The ``DecodingOptions`` keyword arguments parsed by ``add_decoding_flags``."""
    return {f.name: getattr(args, f.name) for f in fields(DecodingOptions)
            if hasattr(args, f.name)}
