"""Command-line flags derived from ``DecodingOptions``: one flag per field, its name, type
and default from the field, its help from the class docstring (``serve ask`` and
``serve evaluate`` share them, as ``python -m training`` derives its flags from
``TrainConfig``), and the rule by which a command's own options and a model folder's
default generation settings (its manifest's ``generation``) combine: ``folder_defaults``,
shared by ``serve ask`` and the OpenAI API."""

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
# A folder's defaults that make it sample: dropped when greedy decoding or beam search is
# asked for. And those that make it search a beam: dropped when sampling is asked for.
SAMPLING_OPTIONS = ("sampling_topk", "sampling_topp", "sampling_temperature", "seed",
                    "generated_candidates")
BEAM_OPTIONS = ("beam_size", "num_hypotheses", "length_penalty", "antilm_weight",
                "antilm_steps")


def folder_defaults(generation: Mapping[str, object],
                    asked: Mapping[str, object]) -> dict[str, object]:
    """The folder's default generation settings that the options ``asked`` for (a
    request's fields, a command's flags) leave in force; ``asked`` then wins over them.
    Options asking for greedy decoding (``sampling_topk`` 1) or beam search
    (``beam_size`` > 1) drop the folder's ``SAMPLING_OPTIONS``; options asking for
    sampling (``sampling_topk`` other than 1) drop its ``BEAM_OPTIONS``."""
    beam = asked.get("beam_size", 1)
    topk = asked.get("sampling_topk")
    if topk == 1 or (isinstance(beam, int) and beam > 1):
        drop: tuple[str, ...] = SAMPLING_OPTIONS
    elif topk is not None:
        drop = BEAM_OPTIONS
    else:
        drop = ()
    return {k: v for k, v in generation.items() if k not in drop}


class _ReplaceDefault(argparse._AppendAction):
    """``append``, but the first value given replaces the default (a model folder's
    suppressed words are replaced by the flags', not added to)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


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
    ``defaults`` replaces the fields' defaults for this command (``--help`` shows them).
    A tuple field's flag is given once per value (``--suppress-words 笨 --suppress-words
    傻``), and the values given replace the default ones."""
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
            group.add_argument(*names, action=_ReplaceDefault, type=kind,
                               default=list(default),
                               metavar=_METAVARS.get(kind, "VALUE"), **common)
        else:
            group.add_argument(*names, type=kind, default=default,
                               metavar=_METAVARS.get(kind, "VALUE"), **common)
    return group


def decoding_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The ``DecodingOptions`` keyword arguments parsed by ``add_decoding_flags``."""
    return {f.name: getattr(args, f.name) for f in fields(DecodingOptions)
            if hasattr(args, f.name)}


def asked_kwargs(parser: argparse.ArgumentParser,
                 args: argparse.Namespace) -> dict[str, object]:
    """The ``DecodingOptions`` keyword arguments whose flags were given a value other
    than their default in ``parser`` (what the command line asks for)."""
    return {name: value for name, value in decoding_kwargs(args).items()
            if value != parser.get_default(name)}
