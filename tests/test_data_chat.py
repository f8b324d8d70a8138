"""Conversation rows: OpenAI/TRL `messages`, ShareGPT `conversations`, multi-turn; the target mask covers exactly
the turns of the roles to train, and caches build from both spellings with the same tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_config

from kdcache.config import TemplateConfig, load_config
from kdcache.data.chat import encode_conversation, resolve_conversations
from kdcache.data.sources import BadRow, Row
from kdcache.errors import BadInputError
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache

DIALOGUES = [
    [("system", "Answer with the GS paper."), ("user", "Budget deficit news"), ("assistant", "GS3"),
     ("user", "And a temple festival?"), ("assistant", "GS1, art and culture")],
    [("user", "Monsoon forecast"), ("assistant", "GS1")],
    [("user", "Supreme Court ruling on privacy"), ("assistant", "GS2"), ("user", "Why?"),
     ("assistant", "Polity and governance"), ("user", "Thanks")],
]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def messages_row(turns):
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def sharegpt_row(turns):
    return {"conversations": [{"from": SHAREGPT[role], "value": text} for role, text in turns]}


def masked_runs(ids, mask):
    """The target positions as runs of consecutive token ids."""
    runs, current = [], []
    for token, target in zip(ids, mask):
        if target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("turns", DIALOGUES)
def test_the_target_mask_covers_exactly_the_assistant_tokens(tokenizer, turns):
    template = TemplateConfig(messages="messages")
    encoded, prompt, target = encode_conversation(template, tokenizer, Row("mem", 1, messages_row(turns)), 256)
    # The reference: each assistant turn's content and end-of-turn token, tokenised on its own.
    expected = [tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
                for role, text in turns if role == "assistant"]
    assert masked_runs(encoded.input_ids, encoded.target_mask) == expected
    # The whole sequence is the chat template's rendering of the conversation, tokenised.
    whole = tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == whole == prompt + target
    first_answer = next(text for role, text in turns if role == "assistant")
    assert prompt.endswith("<|im_start|>assistant\n") and target.startswith(first_answer)


def test_roles_to_train_picks_the_turns_and_sharegpt_reads_the_same(tokenizer):
    turns = DIALOGUES[2]
    users = TemplateConfig(messages="messages", roles_to_train=["user"])
    encoded, _, _ = encode_conversation(users, tokenizer, Row("mem", 1, messages_row(turns)), 256)
    assert masked_runs(encoded.input_ids, encoded.target_mask) == [
        tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"] for role, text in turns if role == "user"]
    chatml, _, _ = encode_conversation(TemplateConfig(messages="messages"), tokenizer,
                                       Row("mem", 1, messages_row(turns)), 256)
    shared, _, _ = encode_conversation(TemplateConfig(messages="conversations"), tokenizer,
                                       Row("mem", 1, sharegpt_row(turns)), 256)
    assert shared == chatml


def test_bad_conversations_are_named_by_row_and_field(tokenizer):
    template = TemplateConfig(messages="messages")
    cases = [
        ({"messages": []}, "is not a non-empty list of turns"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "turn 1 has role 'wizard'"),
        ({"messages": [{"role": "user", "content": None}]}, r"turn 1 \(user\) has no text content"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "has no turn of the roles to train"),
        ({"text": "x"}, "missing field"),
    ]
    for fields, reason in cases:
        with pytest.raises(BadRow, match=f"data.jsonl, row 7, field 'messages': .*{reason}"):
            encode_conversation(template, tokenizer, Row("data.jsonl", 7, fields), 256)
    with pytest.raises(BadRow, match="more than max_length 12.*would drop distilled turns"):
        encode_conversation(template, tokenizer, Row("data.jsonl", 7, messages_row(DIALOGUES[0])), 12)
    with pytest.raises(ValueError, match="roles_to_train must be a non-empty list"):
        TemplateConfig(roles_to_train=["gpt"])


def test_the_default_template_finds_messages_and_conversations():
    for fields, found in ((messages_row(DIALOGUES[1]), "messages"), (sharegpt_row(DIALOGUES[1]), "conversations"),
                          ({"input": "x", "messages": []}, None)):
        assert resolve_conversations(TemplateConfig(), Row("m", 1, fields)).messages == found
    assert resolve_conversations(TemplateConfig(prompt="{q}"), Row("m", 1, messages_row(DIALOGUES[1]))).messages \
        is None


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_messages_and_sharegpt_datasets_build_the_same_cache(tmp_path, teacher_dir):
    """Default templates: the conversation field is found by itself; both spellings give the same tokens, masks
    and teacher targets, and the plan records the field and the roles trained."""
    caches = {}
    for name, make in (("messages", messages_row), ("sharegpt", sharegpt_row)):
        data = _write(tmp_path / f"{name}.jsonl", [make(turns) for turns in DIALOGUES])
        config = load_config(type(make_config("x", "t", "d")), None, [
            f"output={tmp_path / name}", f"teacher.model={teacher_dir}", f"data.paths=[{data}]", "shard_size=2",
            "sparsifier.k=8", "progress=false"])
        assert build_cache(config).finalized
        caches[name] = CacheReader(str(tmp_path / name))
    examples = {name: list(reader.iter_examples()) for name, reader in caches.items()}
    assert len(examples["messages"]) == len(DIALOGUES)
    for a, b in zip(examples["messages"], examples["sharegpt"]):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.target_mask, b.target_mask)
        assert np.array_equal(a.sparse_ids, b.sparse_ids)
    answers = sum(1 for turns in DIALOGUES for role, _ in turns if role == "assistant")
    runs = sum(len(masked_runs(e.input_ids.tolist(), e.target_mask.tolist())) for e in examples["messages"])
    assert runs == answers
    assert caches["messages"].manifest.template.messages == "messages"
    assert caches["sharegpt"].manifest.template.roles_to_train == ("assistant",)


def test_conversations_need_a_chat_template(tmp_path, teacher_dir):
    data = _write(tmp_path / "m.jsonl", [messages_row(DIALOGUES[1])])
    config = make_config(tmp_path / "c", teacher_dir, data, "template.messages=messages", "template.chat='no'")
    with pytest.raises(BadInputError, match="template.chat cannot be 'no'"):
        build_cache(config)


def test_teacher_written_answers_continue_the_conversation(tokenizer):
    """With generate.enabled the prompt is the conversation up to its last user turn, with the generation prompt;
    a final assistant turn becomes the reference."""
    from kdcache.data.chat import prompt_of_conversation

    template = TemplateConfig(messages="messages")
    prompt, reference = prompt_of_conversation(template, tokenizer, Row("m", 1, messages_row(DIALOGUES[1])))
    assert prompt == "<|im_start|>user\nMonsoon forecast<|im_end|>\n<|im_start|>assistant\n" and reference == "GS1"
    prompt, reference = prompt_of_conversation(template, tokenizer, Row("m", 1, messages_row(DIALOGUES[2])))
    assert prompt.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n") and reference == ""
