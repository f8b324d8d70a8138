"""docs/config.md, generated from the config dataclasses in kdcache/config.py: every key with its type, default,
command-line option and help (the field's comment, or its entry in the class docstring).

    python -m kdcache.config_docs --write     # regenerate docs/config.md after changing kdcache/config.py

tests/test_first_hour.py checks that the file is current.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from kdcache import config as C
from kdcache.config_augment import AugmentConfig

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"

#: The job configs a user writes, with the command that reads each.
TOP_LEVEL = [("kdcache cache build", C.CacheBuildConfig), ("kdcache train", C.TrainConfig),
             ("kdcache eval", C.EvalConfig), ("kdcache augment", AugmentConfig)]

HEADER = """# Config keys

Every key a job spec (`--config FILE`, YAML) or `--set KEY=VALUE` can set, for each command, with its type, default,
the command-line option that sets it (where there is one) and what it does. Nested keys are written with dots:
`--set loss.temperature=2` or, in YAML, `loss: {temperature: 2}`. Unknown keys and wrong types are refused with the
list of known keys. YAML reads `yes`/`no` as booleans; the keys that take `auto`/`yes`/`no` accept them either way.

This page is generated from kdcache/config.py by `python -m kdcache.config_docs --write`; a test fails when it is
out of date.
"""


def _field_comments(cls: type) -> dict[str, str]:
    """A dataclass field's comment: the `# ...` at the end of its line, after any full-line `#` comments just above."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            trailing[token.start[0]] = token.string.lstrip("#").strip()
    comments = {}
    (node,) = ast.parse(source).body
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above, row = [], item.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, trailing.get(row, ""))
            row -= 1
        inline = [trailing[n] for n in range(item.lineno, item.end_lineno + 1)
                  if n in trailing and not lines[n - 1].strip().startswith("#")]
        text = " ".join([*above, *inline]).strip()
        if text:
            comments[item.target.id] = text
    return comments


def _docstring_entries(cls: type) -> dict[str, str]:
    """`name: text` entries of a class docstring (continuation lines indented), as LossConfig writes them."""
    entries: dict[str, str] = {}
    current = None
    for line in (inspect.getdoc(cls) or "").splitlines():
        match = re.match(r"^(\w+): (.*)$", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return {key: re.sub(r"``([^`]*)``", r"`\1`", re.sub(r":data:`(\w+)`", r"\1", text))
            for key, text in entries.items()}


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_type_text(a) for a in args)
        return f"{text} or null" if len(args) < len(typing.get_args(tp)) else text
    if origin is list:
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _cli_options() -> dict[tuple[type, str], tuple[str, str]]:
    """(config class, dotted key) -> the command-line option that sets it and its help, from the click commands."""
    from kdcache.cli import main
    from kdcache.cli.options import ConfigOption

    options: dict[tuple[type, str], tuple[str, str]] = {}

    def walk(command) -> None:
        for sub in getattr(command, "commands", {}).values():
            walk(sub)
        for param in getattr(command, "params", []):
            if isinstance(param, ConfigOption):
                names = [*param.opts, *param.secondary_opts]
                options[(param.config_class, param.config_key)] = (" / ".join(f"`{n}`" for n in names),
                                                                   " ".join((param.help or "").split()))

    walk(main)
    return options


def _rows(cls: type, prefix: str, top: type, options: dict) -> list[str]:
    hints = typing.get_type_hints(cls)
    helps = {**_docstring_entries(cls), **_field_comments(cls)}
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            nested.append((tp, key))
            continue
        option, option_help = options.get((top, key), ("", ""))
        help_text = (helps.get(field.name) or option_help).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_text(tp)} | `{json.dumps(_default(field))}` | {option} | {help_text} |")
    for tp, key in nested:
        intro = (inspect.getdoc(tp) or "").split("\n\n")[0].replace("\n", " ")
        rows.append(f"| **`{key}.*`** | section | | | {intro} |")
        rows += _rows(tp, f"{key}.", top, options)
    return rows


def render() -> str:
    """The whole of docs/config.md."""
    options = _cli_options()
    parts = [HEADER]
    for command, cls in TOP_LEVEL:
        intro = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        parts.append(f"## `{command}` ({cls.__name__})\n\n{intro}\n")
        parts.append("| key | type | default | option | help |\n|---|---|---|---|---|")
        parts.append("\n".join(_rows(cls, "", cls, options)) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print (or --write) docs/config.md from kdcache/config.py.")
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH} instead of printing")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
