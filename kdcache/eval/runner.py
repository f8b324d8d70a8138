"""`kdcache eval`: one model over one labelled dataset -> metrics.json, predictions.parquet, report.md and plots."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.config import DataConfig, EvalConfig
from kdcache.data.sources import BadRow, Row, read_rows
from kdcache.data.templates import warn_literal_newlines
from kdcache.errors import BadInputError
from kdcache.eval import metrics as M
from kdcache.eval.scoring import (
    UNPARSED,
    generate,
    label_probabilities,
    label_token_ids,
    load_model,
    parse_label,
    prompt_ids,
    score_labels,
    template_for,
    uses_chat_template,
)
from kdcache.eval.speed import peak_memory, reset_peak_memory, speed_summary, timed
from kdcache.outputs import check_output_folder

EVAL_FORMAT_VERSION = 1


@dataclass
class Example:
    id: str
    gold: Any  # a label string, or a reference text / list of texts
    row: Row


@dataclass
class EvalResult:
    out: Path
    metrics: dict
    predictions: list[dict]
    files: list[Path]


def _check_config(config: EvalConfig) -> None:
    if not config.model:
        raise BadInputError("no model given: pass --model (a model folder, an adapter folder or a hub id)")
    if not config.data:
        raise BadInputError("no data given: pass --data (a JSONL, CSV or Parquet file, or a `datasets` folder)")
    if not config.out:
        raise BadInputError("no output folder given: pass --out")
    check_output_folder(config.out, "--out")  # before the model is loaded and every example scored
    if config.mode == "score" and not config.labels:
        raise BadInputError("label scoring needs the label strings: pass --labels for each one (e.g. --labels GS1 "
                            "--labels GS2 ...)")
    if config.negative_label is not None and config.negative_label not in config.labels:
        raise BadInputError(f"the negative label {config.negative_label!r} must be one of the labels "
                            f"{config.labels}")
    for name in ("batch_size", "max_length", "n_bins", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise BadInputError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.limit is not None and config.limit < 1:
        raise BadInputError(f"limit must be at least 1, got {config.limit}")
    if config.mode == "generate":  # before the model is loaded and every answer generated
        if config.bleu_smoothing not in M.BLEU_SMOOTHING:
            raise BadInputError(f"bleu_smoothing must be one of {list(M.BLEU_SMOOTHING)}, got "
                                f"{config.bleu_smoothing!r}")
        M.check_generation_libraries()


def load_examples(config: EvalConfig) -> list[Example]:
    """The labelled examples, in file order; a row that cannot be used is an error naming its file and row."""
    rows, bad = read_rows(DataConfig(paths=list(config.data), format=config.data_format, limit=config.limit))
    if bad:
        raise BadInputError(f"{len(bad)} unreadable rows in the data; the first: {bad[0]}")
    if not rows:
        raise BadInputError(f"no examples in {', '.join(config.data)}: there is nothing to evaluate")
    id_field = config.id_field
    if id_field is None and all("id" in row.fields for row in rows):
        id_field = "id"
    examples, seen = [], {}
    for number, row in enumerate(rows):
        if id_field is not None:
            if row.fields.get(id_field) is None:
                raise BadInputError(f"{row.where}: no id in field '{id_field}'")
            example_id = str(row.fields[id_field])
        else:
            example_id = f"row-{number}"
        if example_id in seen:
            raise BadInputError(f"{row.where}: id {example_id!r} repeats {seen[example_id]}; ids must be unique "
                                "(runs are matched by id)")
        seen[example_id] = row.where
        if config.label_field not in row.fields or row.fields[config.label_field] is None:
            raise BadInputError(f"{row.where}: no gold label in field '{config.label_field}' (the row has: "
                                f"{', '.join(sorted(row.fields))})")
        gold = row.fields[config.label_field]
        if isinstance(gold, (list, tuple)) and config.mode == "generate" and not config.labels:
            gold = [str(g) for g in gold]
        else:
            gold = str(gold)
        examples.append(Example(example_id, gold, row))
    if config.labels:
        unknown = sorted({e.gold for e in examples} - set(config.labels))
        if unknown:
            raise BadInputError(f"gold labels {unknown} in field '{config.label_field}' are not among the labels "
                                f"{config.labels}: add them with --labels or fix the data")
    return examples


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="ex", desc="eval", disable=not enabled)


def run_eval(config: EvalConfig) -> EvalResult:
    """Evaluate one model and write metrics.json, predictions.parquet, report.md (and plots) to `config.out`."""
    started = time.perf_counter()
    _check_config(config)
    warn_literal_newlines(prompt=config.prompt, system=config.system, label_prefix=config.label_prefix)
    examples = load_examples(config)
    loaded = load_model(config.model, config.device, config.dtype, config.tokenizer, config.base)
    prompting = _prompting(config, loaded.tokenizer)
    records, batch_times, peak = _predict(config, loaded, prompting, examples)
    result = _summarize(config, loaded, prompting, records, batch_times, peak)
    # The whole run (loading included) beside the timed batches' figures: what the eval cost end to end.
    speed = result["speed"]
    speed["wall_s"] = time.perf_counter() - started
    speed["prompt_tokens"] = sum(r["prompt_tokens"] for r in records)
    speed["prompt_tokens_per_s"] = speed["prompt_tokens"] / speed["total_s"] if speed["total_s"] else None
    return write_run(config, result, records)


@dataclass(frozen=True)
class _Prompting:
    """How examples become model inputs: the prompt template, padding, the labels' token ids, the prompt budget."""

    template: Any
    chat_used: bool
    pad_id: int
    labels: list[str]
    label_ids: list[list[int]]
    room: int  # tokens left for the prompt once the longest label (or the generated tokens) fits


def _prompting(config: EvalConfig, tokenizer) -> _Prompting:
    template = template_for(config.prompt, config.system, config.chat)
    chat_used = uses_chat_template(template, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    labels = list(config.labels)
    label_ids = label_token_ids(tokenizer, labels, config.label_prefix, config.label_eos) if labels else []
    if config.mode == "score":
        room = config.max_length - max(len(ids) for ids in label_ids)
    else:
        room = config.max_length - config.max_new_tokens
    if room < 1:
        raise BadInputError(f"max_length {config.max_length} leaves no room for the prompt; raise --max-length")
    return _Prompting(template, chat_used, pad_id, labels, label_ids, room)


def _run_batch(config: EvalConfig, loaded, prompting: _Prompting, batch: list[Example]):
    """The batch's (prompt ids, truncated) and the model's output: label log-likelihoods or generated texts."""
    try:
        encoded = [prompt_ids(prompting.template, loaded.tokenizer, e.row, prompting.room) for e in batch]
    except BadRow as exc:
        raise BadInputError(str(exc)) from None
    prompts = [ids for ids, _ in encoded]
    if config.mode == "score":
        out = score_labels(loaded.model, prompts, prompting.label_ids, prompting.pad_id, loaded.device,
                           vocab_size=len(loaded.tokenizer))
    else:
        out = generate(loaded.model, prompts, loaded.tokenizer, config.max_new_tokens, loaded.device)
    return encoded, out


def _predict(config: EvalConfig, loaded, prompting: _Prompting,
             examples: list[Example]) -> tuple[list[dict], list[float], Any]:
    """Every example's prediction record, batch by batch and timed; also the batch times and peak memory."""
    batches = [examples[i:i + config.batch_size] for i in range(0, len(examples), config.batch_size)]
    reset_peak_memory(loaded.device)
    if config.warmup:
        _run_batch(config, loaded, prompting, batches[0])
    batch_times: list[float] = []
    records: list[dict] = []
    with _progress(len(examples), config.progress) as bar:
        for batch in batches:
            with timed(loaded.device, batch_times):
                encoded, out = _run_batch(config, loaded, prompting, batch)
            latency = batch_times[-1] / len(batch)
            for example, (ids, truncated), output in zip(batch, encoded, out, strict=True):
                records.append(_record(config, prompting.labels, example, ids, truncated, output, latency))
            bar.update(len(batch))
    return records, batch_times, peak_memory(loaded.device)


def _record(config: EvalConfig, labels: list[str], example: Example, ids: list[int], truncated: int, output,
            latency: float) -> dict:
    """One row of predictions.parquet: the prediction, its confidence (and per-label figures), whether it is right."""
    record = {"id": example.id, "gold": example.gold if isinstance(example.gold, str) else example.gold[0],
              "latency_s": latency, "prompt_tokens": len(ids), "prompt_truncated": truncated}
    if config.mode == "score":
        logliks = output
        probs = label_probabilities(logliks)
        best = int(np.argmax(logliks))  # ties go to the first label
        record.update(predicted=labels[best], confidence=float(probs[best]))
        for label, p, ll in zip(labels, probs, logliks):
            record[f"prob_{label}"] = float(p)
            record[f"loglik_{label}"] = float(ll)
    else:
        record["generated"] = output
        record["predicted"] = parse_label(output, labels) if labels else None
        record["confidence"] = None
        record["references"] = [example.gold] if isinstance(example.gold, str) else list(example.gold)
    record["correct"] = (record["predicted"] == record["gold"]) if labels else None
    return record


def _summarize(config: EvalConfig, loaded, prompting: _Prompting, records: list[dict], batch_times: list[float],
               peak) -> dict:
    """metrics.json: the run's settings, the quality metrics, size and speed."""
    labels = prompting.labels
    result: dict = {"kdcache_eval": EVAL_FORMAT_VERSION, "run": _run_settings(config, loaded, prompting, records)}
    if labels:
        confidences = [r["confidence"] for r in records] if config.mode == "score" else None
        result.update(M.classification_metrics([r["gold"] for r in records], [r["predicted"] for r in records],
                                               labels, confidences, config.negative_label, config.n_bins))
        if config.mode == "generate":
            result["unparsed"] = sum(r["predicted"] == UNPARSED for r in records)
    else:
        result["n"] = len(records)
    if config.mode == "generate":
        references = [r["references"] for r in records]
        result["generation"] = M.generation_metrics([r["generated"] for r in records], references,
                                                    config.bleu_smoothing, config.rouge_stemmer)
    result["size"] = {"parameters": loaded.parameters, "adapter_parameters": loaded.adapter_parameters,
                      "size_on_disk_bytes": loaded.size_on_disk_bytes,
                      "base_size_on_disk_bytes": loaded.base_size_on_disk_bytes}
    result["speed"] = speed_summary([r["latency_s"] for r in records], sum(batch_times), config.batch_size,
                                    loaded.device, peak, config.warmup)
    result["speed"]["dtype"] = config.dtype
    return result


def _run_settings(config: EvalConfig, loaded, prompting: _Prompting, records: list[dict]) -> dict:
    """metrics.json's `run`: what was evaluated, on what, and how."""
    return {
        "model": config.model, "base": loaded.base, "tokenizer": config.tokenizer or None,
        "data": list(config.data), "label_field": config.label_field, "labels": prompting.labels,
        "negative_label": config.negative_label, "prompt": config.prompt, "system": config.system,
        "chat_template_used": prompting.chat_used, "label_prefix": config.label_prefix,
        "label_eos": config.label_eos, "mode": config.mode,
        "max_new_tokens": config.max_new_tokens if config.mode == "generate" else None,
        "dtype": config.dtype, "limit": config.limit, "max_length": config.max_length,
        "prompts_truncated": sum(1 for r in records if r["prompt_truncated"]),
    }


def write_run(config: EvalConfig, result: dict, records: list[dict]) -> EvalResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdcache.eval import plots
    from kdcache.eval.report import eval_report

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    path = out / "metrics.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    files.append(path)
    path = out / "predictions.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    files.append(path)
    (out / "eval_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    files.append(out / "eval_config.json")
    images: dict[str, str] = {}
    if config.plots and plots.available():
        if "confusion" in result:
            images["confusion"] = plots.confusion_matrices([("", result["confusion"])], out / "confusion.png").name
        if "calibration" in result:
            images["reliability"] = plots.reliability_diagram([("", result["calibration"])],
                                                              out / "reliability.png").name
        files.extend(out / name for name in images.values())
    path = out / "report.md"
    path.write_text(eval_report(result, images))
    files.append(path)
    return EvalResult(out, result, records, files)


def strip_timing(metrics: dict) -> dict:
    """The metrics without the fields that depend on wall time (for reproducibility checks)."""
    return {key: value for key, value in metrics.items() if key != "speed"}
