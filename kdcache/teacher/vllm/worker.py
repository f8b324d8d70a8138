"""The exact route inside vLLM's worker processes: top-k + exact tail at the target rows only.

vLLM loads `KdcacheWorkerExtension` into every worker (``worker_extension_cls``, set by
`kdcache.teacher.vllm.engine.engine_kwargs`); `kdcache_install`, called once through ``collective_rpc``, patches the
V1 model runner's prompt-logprob step. For kdcache requests (marked by `REQUEST_KEY` in
``SamplingParams.extra_args``) the patched step projects only the target positions through the LM head,
``chunk`` rows at a time, drops LM-head rows past the tokenizer's vocabulary and runs kdcache's own
`topk_with_tail` there, on the workers' device. Each request gets one ``[targets, k + 1]`` array back (column 0:
the tail log-mass; columns 1..k: the top-k), which `kdcache.teacher.vllm.frontend` lets through to the
RequestOutput as it is. Every other request goes to vLLM's own implementation.

vLLM imports this module in every worker, by the qualified name `kdcache.teacher.vllm.engine.EXTENSION`; vLLM itself
is imported only inside functions, so kdcache imports without vLLM.
"""

from __future__ import annotations

import bisect

import torch

from kdcache.targets import SparseTargets
from kdcache.teacher.sparsify import topk_with_tail

REQUEST_KEY = "kdcache"  # SamplingParams.extra_args key that marks a kdcache scoring request

# The model runner attributes the patch reads (vLLM 0.32's V1 GPUModelRunner, which its CPU runner extends).
_RUNNER_ATTRIBUTES = ("_get_prompt_logprobs_dict", "num_prompt_logprobs", "requests", "input_batch", "query_start_loc")


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
        for name in _RUNNER_ATTRIBUTES:
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
    """The kdcache spec of a vLLM request (None for requests that are not kdcache's)."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY)


def _score_requests(runner, hidden_states: torch.Tensor, num_scheduled_tokens: dict, req_ids: list[str]) -> dict:
    """Top-k + tail at the target rows computed in this step; a request's result is emitted with its last chunk.

    hidden_states: [tokens of the step, H]. The target rows of every request in the step go through the LM head
    together, `chunk` rows at a time (requests are grouped by (k, vocab), which one build shares), so a step costs a
    few LM-head calls, not one per request. Returns {req_id: LogprobsTensors of [targets, 1 + G + k]} for the
    requests whose prompt ends in this step (prefill may be split over steps; partial results wait in the runner's
    state): log-prob column 0 is the tail, columns 1..G its log-partition at the spec's G tail temperatures, the
    last k the top-k (whose ids fill the same columns of the id array; the first 1 + G id columns are 0).
    """
    from vllm.v1.outputs import LogprobsTensors

    out = {}
    groups: dict[tuple, list] = {}  # (k, vocab, tail temperatures) -> [(state, lo, hi, hidden positions)]
    finished = []
    for req_id in req_ids:
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted in prefill; it is rescheduled later
            continue
        request = runner.requests[req_id]
        spec = _request_spec(request)
        rows, k, temps = spec["rows"], spec["k"], tuple(spec.get("temps", ()))
        state = runner._kdcache_state.get(req_id)
        if state is None:
            state = {
                "ids": torch.full((len(rows), 1 + len(temps) + k), -1, dtype=torch.int32),
                "logprobs": torch.zeros((len(rows), 1 + len(temps) + k), dtype=torch.float32),
                "chunk": spec["chunk"],
            }
            runner._kdcache_state[req_id] = state
        num_prompt = len(request.prompt_token_ids)
        start = request.num_computed_tokens
        stop = min(start + num_tokens, num_prompt - 1)  # positions of this step that predict a prompt token
        lo, hi = bisect.bisect_left(rows, start), bisect.bisect_left(rows, stop)
        if hi > lo:
            offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]]) - start
            key = (k, spec["vocab"], temps)
            groups.setdefault(key, []).append((state, lo, hi, [r + offset for r in rows[lo:hi]]))
        if start + num_tokens >= num_prompt:  # this step reaches the end of the prompt: emit after scoring
            finished.append((req_id, state, len(rows)))
    for (k, vocab, temps), parts in groups.items():
        positions = torch.tensor([p for part in parts for p in part[3]], dtype=torch.long, device=hidden_states.device)
        chunk = min(part[0]["chunk"] for part in parts)
        pieces = []
        for a in range(0, len(positions), chunk):
            logits = runner.model.compute_logits(hidden_states[positions[a : a + chunk]])
            if logits is None:  # a tensor-parallel rank that does not receive the gathered logits
                break
            pieces.append(topk_with_tail(logits[:, :vocab], k, temps))
        if not pieces:
            continue
        sparse = SparseTargets.cat(pieces)
        g, at = len(temps), 0
        for state, lo, hi, _ in parts:
            n = hi - lo
            state["ids"][lo:hi, : 1 + g] = 0
            state["ids"][lo:hi, 1 + g :] = sparse.ids[at : at + n]
            state["logprobs"][lo:hi, 0] = sparse.tail_logmass[at : at + n]
            if g:
                state["logprobs"][lo:hi, 1 : 1 + g] = sparse.tail_grid[at : at + n]
            state["logprobs"][lo:hi, 1 + g :] = sparse.logprobs[at : at + n]
            at += n
    for req_id, state, num_rows in finished:
        out[req_id] = LogprobsTensors(state["ids"], state["logprobs"], torch.zeros(num_rows, dtype=torch.int32))
        runner.num_prompt_logprobs.pop(req_id, None)
        runner._kdcache_state.pop(req_id, None)
    return out


__all__ = ["REQUEST_KEY", "KdcacheWorkerExtension"]
