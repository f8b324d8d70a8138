"""Command-line options that set config keys, and the one place they become `key=value` overrides.

A command declares such an option with `config_option(ConfigClass, "key.path", "--flag", help=...)`. Its click
type (click.Choice for a Literal, int, float, str) and the default shown by --help come from the config
dataclass, so every default and every list of choices is written once, in kdcache/config.py. The option itself
defaults to None: `options_to_overrides` turns only the options given on the command line into overrides, which
`load_config` applies after the YAML file (`--config`) and before `--set`, so a job spec's values hold for the rest.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import click

config_file_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                                  help="YAML job spec (see jobs/); options given here override its values.")


def set_option(example: str):
    """`--set KEY=VALUE` (repeatable): any config key, applied after the job spec and the other options."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Override any config key, e.g. {example}.")


def config_field_type(cls: type, key: str) -> Any:
    """The annotation of a dotted config key, e.g. `int` for (CacheBuildConfig, "teacher.batch_size")."""
    tp: Any = cls
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `X | None`: the option gives an X
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return tp


def config_default(cls: type, key: str) -> Any:
    """The default value of a dotted config key."""
    value: Any = cls()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _click_type(tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        return click.Choice(list(typing.get_args(tp)))
    if typing.get_origin(tp) is list:  # a repeatable option
        return _click_type(typing.get_args(tp)[0])
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no command-line type for a config key of type {tp!r}")


class ConfigOption(click.Option):
    """A click option for one config key (`config_key`); see `config_option`."""

    def __init__(self, param_decls, *, config_class: type, config_key: str, sets: Any = None, needed: bool = False,
                 **attrs):
        self.config_class, self.config_key, self.sets, self.needed = config_class, config_key, sets, needed
        tp = config_field_type(config_class, config_key)
        if sets is not None:
            attrs["is_flag"] = True
        elif tp is not bool and "type" not in attrs:
            attrs["type"] = _click_type(tp)
        if typing.get_origin(tp) is list:
            attrs.setdefault("multiple", True)
        super().__init__(param_decls, default=None, **attrs)

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if self.sets is None:  # a one-way flag (--no-progress) has no default worth showing
            text = _default_text(config_default(self.config_class, self.config_key), self)
            if text:
                extra["default"] = text
        if self.needed:
            extra["required"] = "required"
        return extra


def _default_text(value: Any, option: click.Option) -> str:
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, bool) and option.secondary_opts:  # --label-eos/--no-label-eos: name the default side
        return (option.opts if value else option.secondary_opts)[0].lstrip("-")
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, str) and value != value.strip():
        return repr(value)
    return str(value)


def config_option(config_class: type, key: str, *param_decls: str, sets: Any = None, needed: bool = False,
                  **attrs):
    """A click option that sets config key `key` of `config_class` when given (and nothing when not).

    `sets`: for a flag such as `--no-progress`, the value the key gets when the flag is given (False). A bool key
    declared as `--x/--no-x` sets True or False; a list key gives a repeatable option. `needed`: --help marks the
    option [required]; the key may come from the --config file instead, and the command checks that it is set.
    """
    return click.option(*param_decls, cls=ConfigOption, config_class=config_class, config_key=key, sets=sets,
                        needed=needed, **attrs)


def options_to_overrides(values: Mapping[str, Any], command: click.Command | None = None) -> list[str]:
    """`key=value` overrides (values in JSON, which YAML reads back) for the config options given on the command.

    `values` are the command's keyword arguments; `command` defaults to the one running. An option left out
    (None, or an empty tuple for a repeatable one, or a `sets` flag not given) sets nothing.
    """
    command = command or click.get_current_context().command
    overrides = []
    for param in command.params:
        if not isinstance(param, ConfigOption) or param.name not in values:
            continue
        value = values[param.name]
        if value is None or value == () or (param.sets is not None and not value):
            continue
        if param.sets is not None:
            value = param.sets
        elif isinstance(value, tuple):
            value = list(value)
        overrides.append(f"{param.config_key}={json.dumps(value)}")
    return overrides
