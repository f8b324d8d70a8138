"""The exact route in the front end (the process that owns the vllm.LLM): the output-processor patch that lets the
workers' ``[targets, k + 1]`` arrays reach `RequestOutput.prompt_logprobs` unchanged."""

from __future__ import annotations

from kdcache.errors import BadInputError
from kdcache.teacher.vllm.worker import REQUEST_KEY

_FRONTEND_PATCHED = False


def install_frontend_capture() -> None:
    """Let kdcache requests' prompt-logprob arrays reach `RequestOutput.prompt_logprobs` as they are.

    vLLM's output processor would turn them into one Python entry per (position, candidate); for requests marked
    as kdcache's, the `LogprobsTensors` is appended to the (list) container instead. Other requests are untouched.
    Patches vLLM's `LogprobsProcessor` class once per process.
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


__all__ = ["install_frontend_capture"]
