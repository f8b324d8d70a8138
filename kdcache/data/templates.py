"""Render a row into (prompt, target) text with Python format strings over the row's fields."""

from __future__ import annotations

import logging
import string

from kdcache.config import TemplateConfig
from kdcache.data.sources import BadRow, Row

log = logging.getLogger(__name__)


def warn_literal_newlines(**templates: str | None) -> list[str]:
    """Log a warning for each template that holds a literal backslash-n (two characters), which a shell passes as is
    from `--prompt 'a\\nb'` in single quotes: the model then sees `\\n`, not a line break. Returns the keys warned.

    Use a real line break: `$'...\\n...'` in bash, a YAML double-quoted string, or --from-cache on `kdcache eval`.
    """
    warned = [key for key, text in templates.items() if text and "\\n" in text]
    for key in warned:
        log.warning("warning: the %s template holds a literal backslash-n (\\n), not a line break: %r. In a shell "
                    "write $'...\\n...' (bash) or put the template in a YAML file in double quotes", key,
                    templates[key])
    return warned


def template_fields(text: str) -> list[str]:
    """The field names a format string refers to (`{title}` -> `title`)."""
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def _render(text: str, row: Row) -> str:
    for name in template_fields(text):
        key = name.split(".", 1)[0].split("[", 1)[0]
        if key not in row.fields:
            raise BadRow(row, f"missing field (the template uses {{{name}}}; the row has: "
                              f"{', '.join(sorted(row.fields)) or 'no fields'})", field=key)
        if row.fields[key] is None:
            raise BadRow(row, "field is empty (null)", field=key)
    return text.format(**row.fields)


def render(template: TemplateConfig, row: Row) -> tuple[str, str]:
    """The prompt and target text of a row; an empty target is a bad row (there would be nothing to distill)."""
    prompt = _render(template.prompt, row)
    target = _render(template.target, row)
    if template.distill == "target" and not target.strip():
        fields = template_fields(template.target)
        raise BadRow(row, "target is empty", field=fields[0] if fields else None)
    return prompt, target


def render_prompt(template: TemplateConfig, row: Row) -> tuple[str, str]:
    """The prompt, and the reference target when the row has its fields (else ""), for teacher-written answers."""
    prompt = _render(template.prompt, row)
    try:
        reference = _render(template.target, row)
    except BadRow:
        reference = ""
    return prompt, reference
