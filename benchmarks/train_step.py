"""Distillation step vs plain cross-entropy (SFT) step: time ratio and peak memory, side by side in one run.

Both steps use the same student, the same batches and the same optimizer. SFT is the usual transformers step
(`model(input_ids, labels=...)`, full [batch, sequence, vocab] logits); the distillation step is kdcache's
`chunked_distillation_loss` (alpha * CE + (1 - alpha) * forward KL on the (k+1) buckets) with logits only at target
positions, chunk by chunk. Targets: every position after the first (`--targets all`, the worst case for
distillation) or only the last `--answer-tokens` positions (answer-only distillation).

    python benchmarks/train_step.py --preset qwen2.5-1.5b --profile t4 --seq-len 1024 --batch-size 4   # GPU
    python benchmarks/train_step.py --preset tiny --seq-len 256 --batch-size 4                          # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kdcache.config import LoraConfig
from kdcache.targets import SparseTargets
from kdcache.train.losses import LossConfig
from kdcache.train.objective import chunked_distillation_loss
from kdcache.train.student import resolve_precision

PRESETS = {
    # Qwen2.5-1.5B-Instruct's shape (config.json of the released model).
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
}


def build_student(preset: str, precision, lora: LoraConfig, gradient_checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**PRESETS[preset], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(precision.device):
        model = Qwen2ForCausalLM(config).to(precision.weight_dtype)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                     target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model.train()


def make_batch(batch: int, seq: int, vocab: int, k: int, targets: str, answer_tokens: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    if targets == "all":
        mask[:, 1:] = True
    else:
        mask[:, seq - answer_tokens:] = True
    n = int(mask.sum())
    logits = torch.randn(n, vocab, generator=g) * 3
    logprobs = torch.log_softmax(logits, -1)
    top, ids = logprobs.topk(k, -1)
    rest = logprobs.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    grid = torch.logsumexp(rest / 2.0, -1)[:, None]  # the tail at T = 2, as a v2 cache stores it
    labels_full = input_ids.masked_fill(~mask, -100)
    sparse = SparseTargets(ids=ids, logprobs=top, tail_logmass=tail, tail_grid=grid, tail_temperatures=(2.0,))
    move = lambda t: t.to(device)  # noqa: E731
    return dict(input_ids=move(input_ids), attention_mask=move(torch.ones_like(input_ids)), target_mask=move(mask),
                labels_full=move(labels_full), labels=move(input_ids[mask]), targets=sparse.to(device))


def sft_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels_full"]).loss


def kd_loss(model, batch, chunk_size: int):
    loss, _ = chunked_distillation_loss(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"],
                                        batch["targets"], batch["labels"], LossConfig(kind="forward_kl", alpha=0.5,
                                                                                      temperature=2.0),
                                        chunk_size=chunk_size, vocab_size=batch["vocab"])
    return loss


def timed_step(model, optimizer, scaler, precision, compute_loss) -> float:
    sync = torch.cuda.synchronize if precision.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                        enabled=precision.autocast_dtype is not None):
        loss = compute_loss()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def peak_of(precision, fn) -> float | None:
    if precision.device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--profile", choices=["cpu", "t4", "bf16"], default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--targets", choices=["all", "answer"], default="all")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-r", type=int, default=16, help="0 for full fine-tuning")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap this process's CUDA memory (e.g. 15 for a T4) with set_per_process_memory_fraction")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    lora = LoraConfig(enabled=args.lora_r > 0, r=max(1, args.lora_r), alpha=2 * max(1, args.lora_r))
    precision = resolve_precision(args.profile, full_finetune=not lora.enabled)
    if args.memory_cap_gib and precision.device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib / total))
    model = build_student(args.preset, precision, lora, args.gradient_checkpointing)
    vocab = PRESETS[args.preset]["vocab_size"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.grad_scaler)
    batches = [make_batch(args.batch_size, args.seq_len, vocab, args.k, args.targets, args.answer_tokens,
                          precision.device, seed) for seed in range(2)]
    for b in batches:
        b["vocab"] = vocab
    steps = {"sft": lambda b: sft_loss(model, b), "kd": lambda b: kd_loss(model, b, args.chunk_size)}
    peaks = {}
    for name, fn in steps.items():  # warm-up, and peak memory of one step each
        peaks[name] = peak_of(precision, lambda fn=fn: timed_step(model, optimizer, scaler, precision,
                                                                  lambda: fn(batches[0])))
    times = {"sft": [], "kd": []}
    for repeat in range(args.repeats):  # alternate, so drifts hit both alike
        for name in (("sft", "kd") if repeat % 2 == 0 else ("kd", "sft")):
            times[name].append(timed_step(model, optimizer, scaler, precision,
                                          lambda name=name, repeat=repeat: steps[name](batches[repeat % 2])))
    sft, kd = statistics.median(times["sft"]), statistics.median(times["kd"])
    tokens = args.batch_size * args.seq_len
    device = torch.cuda.get_device_name(0) if precision.device.type == "cuda" else platform.processor() or "cpu"
    figures = {
        "preset": args.preset, "profile": args.profile, "device": device, "torch": torch.__version__,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "targets": args.targets, "k": args.k,
        "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing,
        "sft_step_s": sft, "kd_step_s": kd, "kd_over_sft": kd / sft,
        "sft_tokens_per_s": tokens / sft, "kd_tokens_per_s": tokens / kd,
        "sft_peak_gib": peaks["sft"], "kd_peak_gib": peaks["kd"],
    }
    print(f"device {device}, torch {torch.__version__}, preset {args.preset}, profile {args.profile}")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, targets={args.targets}, k={args.k}, "
          f"lora_r={args.lora_r}, repeats={args.repeats}")
    print(f"{'':8}{'step (s)':>12}{'tokens/s':>12}{'peak GiB':>12}")
    for name, label in (("sft", "SFT"), ("kd", "KD")):
        peak = figures[f"{name}_peak_gib"]
        print(f"{label:8}{figures[f'{name}_step_s']:12.4f}{figures[f'{name}_tokens_per_s']:12.0f}"
              f"{(f'{peak:.2f}' if peak is not None else 'n/a'):>12}")
    print(f"KD / SFT step time: {figures['kd_over_sft']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
