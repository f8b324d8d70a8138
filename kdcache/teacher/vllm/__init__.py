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

The package, by where its code runs:

* `engine`: the `vllm.LLM(...)` arguments (`teacher.vllm` passed through), the scoring route, start and shutdown;
* `worker`: `KdcacheWorkerExtension`, the exact route inside vLLM's worker processes;
* `frontend`: the output-processor patch that lets the workers' arrays reach `RequestOutput` unchanged;
* `teacher`: `VLLMTeacher` (the backend) and `make_vllm_backend`, decoding both routes' outputs into `SparseTargets`.
"""

from kdcache.teacher.vllm.engine import engine_kwargs, require_vllm, scoring_route, shutdown_engine, start_engine
from kdcache.teacher.vllm.teacher import VLLMTeacher, derived_tail, make_vllm_backend, target_rows
from kdcache.teacher.vllm.worker import KdcacheWorkerExtension

__all__ = [
    "KdcacheWorkerExtension",
    "VLLMTeacher",
    "derived_tail",
    "engine_kwargs",
    "make_vllm_backend",
    "require_vllm",
    "scoring_route",
    "shutdown_engine",
    "start_engine",
    "target_rows",
]
