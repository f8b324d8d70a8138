"""`kdcache export-harness`: a `kdcache eval` task as an lm-evaluation-harness task (YAML + local JSONL).

The prompts are rendered here, with kdcache's own template code, into `<task>.jsonl` (one row per example: `id`,
`prompt`, and `gold` (label scoring: the gold label's index) or `references` (generation)), so the harness sees
exactly the prompts `kdcache eval` scores. `<task>.yaml` points at that file by its absolute path:

- label scoring -> `output_type: multiple_choice`: the harness scores `target_delimiter + label` after the prompt
  (kdcache's `label_prefix + label`), predicts the most likely label and reports `acc` (kdcache's accuracy);
- generation -> `output_type: generate_until` (greedy, `max_gen_toks` = kdcache's max_new_tokens), scored by
  `kdcache_harness.py` next to the YAML with kdcache's own metric functions: exact_match, token_f1 (SQuAD),
  rouge_l (rouge-score), bleu and chrf (sacrebleu), all on kdcache's 0..1 scale.

Run: lm_eval --model hf --model_args pretrained=EXPORTED_MODEL --include_path OUT --tasks TASK
(add --apply_chat_template, and --system_instruction for `system`, when kdcache evaluated with the chat template).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdcache.config import EvalConfig
from kdcache.data.sources import BadRow
from kdcache.data.templates import render
from kdcache.errors import BadInputError
from kdcache.eval.scoring import template_for

HARNESS_METRICS_MODULE = "kdcache_harness"
_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# The generation task's scoring, written next to its YAML (the harness imports it by file with `!function`).
_METRICS_SOURCE = '''"""Scoring of a kdcache generation task in lm-evaluation-harness, with kdcache's own metric functions
(written by `kdcache export-harness`; needs kdcache installed with its eval extra beside lm-eval)."""

from kdcache.eval import metrics as M

BLEU_SMOOTHING = {bleu_smoothing!r}
ROUGE_STEMMER = {rouge_stemmer!r}


def process_results(doc, results):
    prediction, references = results[0], doc["references"]
    return {{
        "exact_match": max(M.exact_match_one(prediction, r) for r in references),
        "token_f1": max(M.token_f1_one(prediction, r) for r in references),
        "rouge_l": M.rouge_l([prediction], [references], use_stemmer=ROUGE_STEMMER),
        "bleu": (prediction, references),
        "chrf": (prediction, references),
    }}


def bleu(items):
    """Corpus BLEU (sacrebleu) over (prediction, references) pairs, on a 0..1 scale."""
    return M.corpus_bleu([p for p, _ in items], [r for _, r in items], smoothing=BLEU_SMOOTHING)["bleu"]


def chrf(items):
    """Corpus chrF (sacrebleu) over (prediction, references) pairs, on a 0..1 scale."""
    return M.corpus_chrf([p for p, _ in items], [r for _, r in items])["chrf"]
'''


class _FunctionTag(str):
    """A `!function module.name` value in the harness YAML (the harness's own loader resolves it)."""


def _function_representer(dumper: yaml.SafeDumper, value: _FunctionTag):
    return dumper.represent_scalar("!function", str(value))


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FunctionTag, _function_representer)


@dataclass(frozen=True)
class HarnessExport:
    task: str
    yaml_path: Path
    data_path: Path
    n: int
    output_type: str
    notes: tuple[str, ...]


def _rows(config: EvalConfig) -> list[dict]:
    """One JSON row per example: id, the rendered prompt, and the gold label's index or the reference list."""
    from kdcache.eval.runner import load_examples

    template = template_for(config.prompt, config.system, "no")
    rows = []
    for example in load_examples(config):
        try:
            prompt, _ = render(template, example.row)
        except BadRow as exc:
            raise BadInputError(str(exc)) from None
        row = {"id": example.id, "prompt": prompt}
        if config.mode == "score":
            row["gold"] = config.labels.index(example.gold)
        else:
            row["references"] = [example.gold] if isinstance(example.gold, str) else list(example.gold)
        rows.append(row)
    if config.mode == "generate":
        # the harness' corpus metrics, like sacrebleu's streams, want as many references per example: repeat the
        # first (a repeated reference changes neither BLEU nor chrF nor any max-over-references score)
        width = max(len(row["references"]) for row in rows)
        for row in rows:
            row["references"] += [row["references"][0]] * (width - len(row["references"]))
    return rows


def _task_yaml(config: EvalConfig, task: str, data_path: Path) -> dict:
    spec: dict = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "doc_to_text": "prompt",
    }
    if config.mode == "score":
        spec.update({
            "output_type": "multiple_choice",
            "doc_to_choice": list(config.labels),
            "doc_to_target": "gold",
            "target_delimiter": config.label_prefix,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        })
    else:
        module = HARNESS_METRICS_MODULE
        spec.update({
            "output_type": "generate_until",
            "doc_to_target": "references",
            "generation_kwargs": {"until": [], "max_gen_toks": config.max_new_tokens, "do_sample": False},
            "process_results": _FunctionTag(f"{module}.process_results"),
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
                {"metric": "token_f1", "aggregation": "mean", "higher_is_better": True},
                {"metric": "rouge_l", "aggregation": "mean", "higher_is_better": True},
                {"metric": "bleu", "aggregation": _FunctionTag(f"{module}.bleu"), "higher_is_better": True},
                {"metric": "chrf", "aggregation": _FunctionTag(f"{module}.chrf"), "higher_is_better": True},
            ],
        })
    spec["metadata"] = {"version": 1, "exported_by": "kdcache export-harness", "kdcache_mode": config.mode,
                        "kdcache_data": list(config.data), "kdcache_chat": config.chat}
    return spec


def export_harness_task(config: EvalConfig, out: str | Path, task: str) -> HarnessExport:
    """Write `<task>.yaml` and `<task>.jsonl` (and, for generation, kdcache_harness.py) to `out`."""
    if not _TASK_NAME.match(task or ""):
        raise BadInputError(f"the task name must be letters, digits, '_', '-' or '.', got {task!r}")
    if not config.data:
        raise BadInputError("no data given: pass --data (a JSONL, CSV or Parquet file, or a `datasets` folder)")
    if config.mode == "score" and not config.labels:
        raise BadInputError("a label-scoring task needs the label strings: pass --labels for each one")
    if config.mode == "generate":
        from kdcache.eval.metrics import BLEU_SMOOTHING

        if config.bleu_smoothing not in BLEU_SMOOTHING:
            raise BadInputError(f"bleu_smoothing must be one of {list(BLEU_SMOOTHING)}, got "
                                f"{config.bleu_smoothing!r}")
    rows = _rows(config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    data_path = (folder / f"{task}.jsonl").resolve()
    data_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    yaml_path = folder / f"{task}.yaml"
    yaml_path.write_text(yaml.dump(_task_yaml(config, task, data_path), Dumper=_Dumper, sort_keys=False,
                                   allow_unicode=True), encoding="utf-8")
    notes = []
    if config.mode == "generate":
        (folder / f"{HARNESS_METRICS_MODULE}.py").write_text(_METRICS_SOURCE.format(
            bleu_smoothing=config.bleu_smoothing, rouge_stemmer=config.rouge_stemmer), encoding="utf-8")
    if config.label_eos and config.mode == "score":
        notes.append("label_eos is not exported: the harness scores each label without EOS after it")
    if config.chat != "no":
        notes.append(f"chat is {config.chat!r}: if kdcache eval used the model's chat template, add "
                     "--apply_chat_template to lm_eval" + (" and --system_instruction with the system prompt"
                                                           if config.system else ""))
    output_type = "multiple_choice" if config.mode == "score" else "generate_until"
    return HarnessExport(task, yaml_path, data_path, len(rows), output_type, tuple(notes))
