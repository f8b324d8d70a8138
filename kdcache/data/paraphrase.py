"""Paraphrases for `kdcache augment`: a local model rewrites each source row's text with seeded style prompts,
through the cache build's own generation path (`TeacherBackend.generate`, HF or vLLM, `kdcache.teacher.generate`).

Resumable: each batch's paraphrases are appended to OUTPUT.paraphrases.jsonl (a header line with the settings,
then one line per (source position, source id, version)) and flushed before the next batch, so a killed run loses
at most the batch in flight and a re-run generates only what is missing. A file written with other settings is
refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from kdcache.config import CacheBuildConfig, GenerateConfig, TemplateConfig, to_dict
from kdcache.config_augment import AugmentConfig
from kdcache.errors import BadInputError

__all__ = ["paraphrase_sources", "progress_path", "style_choices"]


def progress_path(output: str) -> Path:
    """Where the paraphrases of `output` are kept as they are written."""
    return Path(output + ".paraphrases.jsonl")


def style_choices(num_styles: int, versions: int, seed: int, source_id: str, position: int) -> list[int]:
    """The style prompt (an index into `styles`) of each version of one source: distinct while there are enough
    styles, seeded by (seed, position, source id) alone."""
    rng = random.Random(f"{seed}:{position}:{source_id}")
    chosen = rng.sample(range(num_styles), min(versions, num_styles))
    return chosen + [rng.randrange(num_styles) for _ in range(versions - len(chosen))]


def _sample_seed(seed: int, source_id: str, position: int, version: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{position}:{source_id}:{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


def _settings(config: AugmentConfig) -> dict:
    """What decides the paraphrases' text (not the device or batch size)."""
    p = to_dict(config.paraphrase)
    teacher = p.pop("teacher")
    return {**p, "model": teacher["model"], "revision": teacher["revision"], "backend": teacher["backend"],
            "dtype": teacher["dtype"]}


def _read_progress(path: Path, settings: dict) -> dict[tuple[int, str, int], str]:
    """The paraphrases already written, by (position, source id, version); a cut last line (a kill) is ignored."""
    if not path.exists():
        return {}
    done = {}
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if header is None:
        return {}
    if header.get("settings") != settings:
        raise BadInputError(f"{path} holds paraphrases written with other paraphrase settings "
                            f"({json.dumps(header.get('settings'))}); restore those settings to resume, or delete the "
                            "file to start over")
    for line in lines[1:]:
        try:
            item = json.loads(line)
            done[(int(item["position"]), str(item["source_id"]), int(item["version"]))] = str(item["text"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # the line a kill cut short
    return done


def _load(config: AugmentConfig, backend, tokenizer):
    from kdcache.modeling import load_tokenizer
    from kdcache.teacher.build import make_backend

    p = config.paraphrase
    build = CacheBuildConfig(teacher=p.teacher, max_length=p.max_length, generate=_generate_settings(config))
    tokenizer = tokenizer or load_tokenizer(p.teacher.model, p.teacher.revision, p.teacher.trust_remote_code)
    backend = backend or make_backend(build, len(tokenizer))
    return backend, tokenizer


def _generate_settings(config: AugmentConfig) -> GenerateConfig:
    p = config.paraphrase
    return GenerateConfig(enabled=True, num_samples=1, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                          top_p=p.top_p, seed=p.seed)


def paraphrase_sources(config: AugmentConfig, sources: list[dict], backend=None, tokenizer=None,
                       stop_after_batches: int | None = None) -> dict[tuple[int, int], str]:
    """Each source's paraphrases, by (position in `sources`, version); generated where OUTPUT.paraphrases.jsonl
    does not have them yet, in batches of teacher.batch_size, and appended there batch by batch."""
    from tqdm import tqdm

    from kdcache.data.encode import encode_prompt
    from kdcache.teacher.generate import cut_at_stop, stop_token_ids

    p = config.paraphrase
    if p.max_new_tokens >= p.max_length:
        raise BadInputError(f"paraphrase.max_new_tokens must be below paraphrase.max_length ({p.max_length}), got "
                            f"{p.max_new_tokens}")
    settings = _settings(config)
    path = progress_path(config.output)
    done = _read_progress(path, settings)
    todo = []  # (position, source id, version, style index)
    for position, source in enumerate(sources):
        text = source.get(p.text_field)
        if not isinstance(text, str):
            raise BadInputError(f"paraphrase.text_field must name a text field of every row, got {p.text_field!r} "
                                f"(source {source['source_id']} has {text!r})")
        styles = style_choices(len(p.styles), p.versions, p.seed, source["source_id"], position)
        todo += [(position, source["source_id"], v, s) for v, s in enumerate(styles)
                 if (position, source["source_id"], v) not in done]
    if todo:
        backend, tokenizer = _load(config, backend, tokenizer)
        stop_ids = stop_token_ids(tokenizer, p.teacher.model, p.teacher.revision)
        template = TemplateConfig(chat="auto")
        generate = _generate_settings(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or not done
        with open(path, "w" if fresh else "a", encoding="utf-8") as handle, \
                tqdm(total=len(todo), unit="paraphrase", desc="paraphrasing", disable=not config.progress) as bar:
            if fresh:
                handle.write(json.dumps({"settings": settings}) + "\n")
            for batch_number, start in enumerate(range(0, len(todo), p.teacher.batch_size)):
                if stop_after_batches is not None and batch_number >= stop_after_batches:
                    break
                batch = todo[start : start + p.teacher.batch_size]
                prompts = [encode_prompt(template, tokenizer, p.styles[s].format(text=sources[i][p.text_field]),
                                         p.max_length - p.max_new_tokens).input_ids for i, _, _, s in batch]
                seeds = [_sample_seed(p.seed, sid, i, v) for i, sid, v, _ in batch]
                answers = backend.generate(prompts, generate, seeds, stop_ids)
                for (i, sid, v, s), samples in zip(batch, answers):
                    ids, stopped = cut_at_stop(samples[0], stop_ids)
                    text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
                    done[(i, sid, v)] = text
                    handle.write(json.dumps({"position": i, "source_id": sid, "version": v, "style": s,
                                             "text": text}, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(batch))
    return {(i, v): text for (i, sid, v), text in done.items()
            if i < len(sources) and sources[i]["source_id"] == sid}
