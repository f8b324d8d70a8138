"""Render a row into (prompt, target) text with Python format strings over the row's fields."""

from __future__ import annotations

import string

from kdcache.config import TemplateConfig
from kdcache.data.sources import BadRow, Row


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
