"""The README.md model card `kdcache export` writes beside a merged student: where it came from, in numbers.

It reads what the run folder already holds (``train_config.json``, ``run_summary.json``, ``metrics.jsonl``, next to
the exported ``final/`` or ``best/``) and each cache's manifest, so the card names the teacher, the cache's plan
hash (its fingerprint: two caches with the same hash hold the same targets) and format, the student base, the loss
and its settings, the steps, the last held-out figures, and the results of a ``kdcache compare`` folder when given.
Nothing is required: a missing piece is left out.
"""

from __future__ import annotations

import json
from pathlib import Path


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_eval(run: Path) -> dict | None:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    evals = [r for r in (json.loads(line) for line in lines if line.strip()) if "heldout_kd" in r]
    return evals[-1] if evals else None


def _cache_lines(path: str) -> list[str]:
    manifest = _read_json(Path(path) / "manifest.json")
    if manifest is None:
        return [f"- cache `{path}` (its manifest was not readable when this card was written)"]
    teacher = manifest.get("teacher", {})
    sparsifier = manifest.get("sparsifier", {})
    counts = manifest.get("counts", {})
    encoding = ("plain " + str(sparsifier.get("logprob_dtype")) if sparsifier.get("logprob_step") is None else
                f"offsets, step {sparsifier['logprob_step']:g}" + (
                    f", growth {sparsifier['logprob_growth']:g}" if sparsifier.get("logprob_growth") else ""))
    return [
        f"- cache `{path}`: plan hash `{manifest.get('plan_hash', 'none (format v1/v2)')}`, "
        f"format v{manifest.get('format_version')}",
        f"  - teacher `{teacher.get('model')}` ({teacher.get('backend')}, {teacher.get('dtype')}); tokenizer "
        f"fingerprint `{manifest.get('tokenizer', {}).get('fingerprint')}`",
        f"  - {sparsifier.get('kind')} k = {sparsifier.get('k')}, log-probs {encoding}, tail temperatures "
        f"{sparsifier.get('tail_temperatures') or 'none'}; {counts.get('num_examples')} examples, "
        f"{counts.get('num_targets')} target tokens",
    ]


def _compare_lines(folder: str) -> list[str]:
    """The results of a `kdcache compare --out` folder (its comparison.json): the side-by-side rows, the retention and
    the success criteria."""
    found = _read_json(Path(folder) / "comparison.json")
    if found is None:
        return ["", "## Evaluation", "", f"- the comparison in `{folder}` was not readable when this card was written"]
    runs = found.get("runs", {})
    name_a, name_b = (runs.get(key, {}).get("name", key) for key in ("A", "B"))
    lines = ["", "## Evaluation", "", f"`kdcache compare` of {name_a} (A, the reference) and {name_b} (B):", "",
             f"| metric | {name_a} | {name_b} | B - A |", "|---|---|---|---|"]
    cell = (lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    lines += [f"| {row.get('title', row.get('metric'))} | {cell(row.get('a'))} | {cell(row.get('b'))} | "
              f"{cell(row.get('difference'))} |" for row in found.get("rows", [])]
    kept = {k: v for k, v in (found.get("retention") or {}).items() if v is not None}
    if kept:
        lines += ["", "Retention (B / A): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in kept.items())]
    if found.get("criteria"):
        held = sum(bool(c.get("passed")) for c in found["criteria"])
        lines += ["", f"Success criteria: {held} of {len(found['criteria'])} hold"]
        lines += [f"- {'pass' if c.get('passed') else 'FAIL'}: {c.get('check')}" for c in found["criteria"]]
    return lines


def model_card(adapter: str, base: str, *, merged: bool = True, dtype: str | None = None,
               compare: str | None = None, base_is_hub_id: bool = True) -> str:
    """The card's Markdown for the student exported from `adapter` (a run's final/ or best/) on `base` (its hub id
    when known: `base_is_hub_id`; the Hub's ``base_model:`` metadata takes only an id), merged in `dtype` or the
    adapter alone, with the results of a `kdcache compare` folder when given."""
    run = Path(adapter).resolve().parent
    config = _read_json(run / "train_config.json") or {}
    summary = _read_json(run / "run_summary.json") or {}
    caches = [c["path"] for c in config.get("caches") or []] or ([config["cache"]] if config.get("cache") else [])
    loss = config.get("loss") or {}
    what = (f"Student `{base}` with the LoRA adapter `{adapter}` merged in ({dtype} weights)" if merged else
            f"The LoRA adapter `{adapter}` of the student `{base}` (load it with peft on that base)")
    lines = ["---", *([f"base_model: {base}"] if base_is_hub_id else []),
             f"library_name: {'transformers' if merged else 'peft'}", "tags: [distillation, kdcache]", "---", "",
             f"# {run.name} (distilled with kdcache)", "",
             f"{what}, trained offline from a teacher cache (the teacher was never loaded during training).", "",
             "## Teacher cache", ""]
    lines += [line for path in caches for line in _cache_lines(path)] or ["- not recorded"]
    lines += ["", "## Training", ""]
    if loss:
        lines.append(f"- loss `{loss.get('kind')}` at T = {loss.get('temperature')}, ce_weight {loss.get('ce_weight')}, "
                     f"kd_weight {loss.get('kd_weight')}" + (f", hidden_weight {loss['hidden_weight']}"
                                                             if loss.get("hidden_weight") else ""))
    for key in ("lr", "batch_size", "max_steps", "seed", "profile"):
        if key in config:
            lines.append(f"- {key}: {config[key]}")
    if config.get("lora"):
        lines.append(f"- LoRA r = {config['lora'].get('r')}, alpha {config['lora'].get('alpha')}, "
                     f"targets {config['lora'].get('target_modules')}")
    if "step" in summary:
        lines.append(f"- steps: {summary['step']}")
    last = _last_eval(run)
    if last:
        figures = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("heldout") and
                            isinstance(v, (int, float)) and not isinstance(v, bool))
        lines.append(f"- last held-out evaluation (step {last.get('step')}): {figures}")
    if summary.get("heldout"):
        lines.append(f"- held out: {summary['heldout']}")
    if compare is not None:
        lines += _compare_lines(compare)
    return "\n".join(lines) + "\n"


def write_model_card(adapter: str, base: str, out: str, **options) -> Path:
    """README.md in `out` (:func:`model_card`'s keyword `options`)."""
    path = Path(out) / "README.md"
    path.write_text(model_card(adapter, base, **options))
    return path
