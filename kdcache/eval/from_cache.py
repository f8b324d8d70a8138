"""The prompt settings of a cache, for `kdcache eval --from-cache`: a student is evaluated on the prompt it was
trained on, not on a copy typed again (where a shell's `'...\\n...'` silently differs from the cache's line break)."""

from __future__ import annotations

import json
import string


def target_prefix_and_field(target: str) -> tuple[str, str | None]:
    """The literal text before the first field of a target template, and that field when the template is exactly
    prefix + one field (" {gs_paper}" -> (" ", "gs_paper"); "Answer: {a} ({b})" -> ("Answer: ", None))."""
    parts = list(string.Formatter().parse(target))
    fields = [name for _, name, _, _ in parts if name is not None]
    if not fields:  # a constant target: nothing to score labels after
        return "", None
    prefix = parts[0][0]
    single = len(fields) == 1 and parts[0][1] == fields[0] and not parts[0][2] and not parts[0][3]
    tail = "".join(literal for literal, *_ in parts[1:])
    return prefix, fields[0] if single and not tail and fields[0].isidentifier() else None


def eval_settings_from_cache(path: str) -> dict:
    """EvalConfig values taken from a cache's plan: `prompt`, `system`, `chat` (yes/no: whether the build applied
    the tokenizer's chat template), `label_prefix` (the target template's text before its field) and, when the
    target template is one field, `label_field`. Works on a finished cache and on one still being built."""
    from kdcache.store.location import CacheLocation
    from kdcache.store.manifest import read_plan

    template = read_plan(CacheLocation(path)).template  # a cache's plan.json (kept after the build finishes)
    prefix, field = target_prefix_and_field(template.target)
    settings = {"prompt": template.prompt, "system": template.system,
                "chat": "yes" if template.chat_template_used else "no", "label_prefix": prefix}
    if field is not None:
        settings["label_field"] = field
    return settings


def overrides_from_cache(path: str) -> list[str]:
    """`key=value` overrides (JSON values) of `eval_settings_from_cache`, to apply before the command's own options."""
    return [f"{key}={json.dumps(value)}" for key, value in eval_settings_from_cache(path).items()]
