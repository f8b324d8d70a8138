"""`VLLMTeacher`: the `teacher.backend=vllm` backend, teacher-forced scoring and generation on a vLLM engine.

It sends each sequence as one request and turns what comes back into `SparseTargets`: the workers' arrays on the
exact route (`kdcache.teacher.vllm.worker`), or vLLM's flat prompt logprobs with a derived tail on the
prompt_logprobs route. See `kdcache.teacher.vllm` for the two routes and what each stores.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.config import GenerateConfig, TeacherConfig
from kdcache.errors import BadInputError
from kdcache.targets import SparseTargets
from kdcache.teacher.backend import Sparsifier
from kdcache.teacher.vllm.engine import SCORING_ROUTES, require_vllm, scoring_route, start_engine
from kdcache.teacher.vllm.frontend import install_frontend_capture
from kdcache.teacher.vllm.worker import REQUEST_KEY

TAIL_FLOOR = float(np.finfo(np.float32).eps)  # derived tails below this mass are not resolved by float32 log-probs


def target_rows(mask: list[bool]) -> list[int]:
    """Positions whose hidden state predicts a target token: t - 1 for every target token t."""
    if mask and mask[0]:
        raise BadInputError("the first token of a sequence cannot be a target (nothing predicts it)")
    return [t - 1 for t, m in enumerate(mask) if m]


class VLLMTeacher:
    """A `TeacherBackend` on a vLLM engine; same output as `HFTeacher`.

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

    def _probe(self, sparsify: Sparsifier) -> SparseTargets:
        """What the build's sparsifier returns for one row: its k and tail temperatures, for the workers' spec."""
        probe = sparsify(torch.zeros((1, self.vocab_size)), slice(0, 1))
        if probe.tail_logmass is None:
            raise BadInputError(
                "teacher.backend=vllm supports sparsifier.kind=topk only: the sample sparsifier draws from the full "
                "distribution with per-example seeds, which vLLM's workers are not given. Use teacher.backend=hf "
                "for sampled caches"
            )
        return probe

    def score(
        self,
        batch_ids: list[list[int]],
        batch_masks: list[list[bool]],
        sparsify: Sparsifier,
    ) -> list[SparseTargets]:
        """Sparse targets for every target row of the batch, in (example, position) order (one chunk per example)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        probe = self._probe(sparsify)
        k, temps = int(probe.ids.shape[1]), probe.tail_temperatures
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
                spec = {"rows": rows, "k": k, "vocab": self.vocab_size, "chunk": self.config.chunk_size,
                        "temps": list(temps)}
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0,
                                             extra_args={REQUEST_KEY: spec}))
            else:
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=k,
                                             flat_logprobs=True))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        chunks = [_empty(k, temps) for _ in batch_ids]
        for i, output in zip(which, outputs):
            if self.scoring == "exact":
                chunks[i] = self._from_arrays(output, len(rows_per_example[i]), temps)
            else:
                chunks[i] = self._from_flat(output, rows_per_example[i], k)
        return chunks

    def generate(self, prompts: list[list[int]], settings: GenerateConfig, seeds: list[int],
                 stop_ids: list[int]) -> list[list[list[int]]]:
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

    def _from_arrays(self, output, num_rows: int, temps: tuple[float, ...]) -> SparseTargets:
        """Decode the worker's [rows, 1 + G + k] arrays: tail, its log-partition at the G temperatures, top-k."""
        parts = [p for p in (output.prompt_logprobs or []) if p is not None]
        if len(parts) != 1 or not hasattr(parts[0], "logprob_token_ids"):
            raise RuntimeError(
                "vLLM returned no kdcache arrays for a request: the worker extension is not active in this engine "
                "(start it with kdcache.teacher.vllm.start_engine, or use teacher.vllm.scoring=prompt_logprobs)"
            )
        ids = torch.as_tensor(parts[0].logprob_token_ids)
        logprobs = torch.as_tensor(parts[0].logprobs)
        if ids.shape[0] != num_rows or bool((ids[:, 1:] < 0).any()):
            raise RuntimeError(f"vLLM scored {ids.shape[0]} rows of a request with {num_rows} target rows, some unset")
        g = len(temps)
        return SparseTargets(ids[:, 1 + g :].to(torch.int32).contiguous(), logprobs[:, 1 + g :].float().contiguous(),
                             tail_logmass=logprobs[:, 0].float().contiguous(),
                             tail_grid=logprobs[:, 1 : 1 + g].float().contiguous() if g else None,
                             tail_temperatures=tuple(temps) if g else ())

    def _from_flat(self, output, rows: list[int], k: int) -> SparseTargets:
        flat = output.prompt_logprobs
        starts = np.asarray(flat.start_indices, dtype=np.int64)
        token_ids = np.asarray(flat.token_ids, dtype=np.int64)
        values = np.asarray(flat.logprobs, dtype=np.float64)
        # Token t (predicted from row t - 1) sits at position t of the container: the actual token, then ranks 1..k.
        first = starts[np.asarray(rows, dtype=np.int64) + 1] + 1
        index = first[:, None] + np.arange(k)[None, :]
        return prompt_logprob_targets(token_ids[index], values[index], self.vocab_size)


def prompt_logprob_targets(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int,
                           fix: str = "use teacher.vllm.scoring=exact") -> SparseTargets:
    """`SparseTargets` from vLLM prompt logprobs already cut to the k ranked entries of each target row: ids and
    log-probs [T, k] (rank 1 first), the tail derived (`derived_tail`). An id past the tokenizer's vocabulary (an
    LM-head padding row, which vLLM's softmax includes) is refused, saying `fix`. Also used by `kdcache cache import`
    for users' dumps of prompt_logprobs (kdcache.interop.vllm)."""
    if (ids >= vocab_size).any():
        raise BadInputError(
            "vLLM put an LM-head padding row (an id past the tokenizer's vocabulary) in a top-k; the "
            f"prompt_logprobs route cannot remove padding rows: {fix}"
        )
    return SparseTargets(torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(logprobs.astype(np.float32)),
                         tail_logmass=torch.from_numpy(derived_tail(logprobs).astype(np.float32)))


def derived_tail(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(logprobs)) per row, as log(-expm1(logsumexp)), with the mass floored at float32 eps."""
    top = np.logaddexp.reduce(logprobs.astype(np.float64), axis=-1)
    mass = -np.expm1(np.minimum(top, 0.0))
    return np.log(np.maximum(mass, TAIL_FLOOR))


def _empty(k: int, temps: tuple[float, ...] = ()) -> SparseTargets:
    """The targets of an example without target rows (with as many tail-temperature columns as the others)."""
    return SparseTargets(torch.zeros((0, k), dtype=torch.int32), torch.zeros((0, k)), tail_logmass=torch.zeros(0),
                         tail_grid=torch.zeros((0, len(temps))) if temps else None, tail_temperatures=tuple(temps))


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


__all__ = ["TAIL_FLOOR", "VLLMTeacher", "derived_tail", "make_vllm_backend", "prompt_logprob_targets", "target_rows"]
