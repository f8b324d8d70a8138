"""Distillation step vs plain cross-entropy (SFT) step: time ratio and peak memory, side by side in one run.

Three steps, same student, batches and optimizer, timed in rotating order (A B C, B C A, C A B, ...), medians:
SFT as transformers does it (`model(input_ids, labels=...)`, full [batch, sequence, vocab] logits); SFT with a
chunked CE (kdcache's chunked path at alpha = 1: logits only at the label positions, chunk by chunk, recomputed in
backward, what a Liger-style loss gives); and the distillation step, kdcache's `chunked_distillation_loss` (alpha *
CE + (1 - alpha) * forward KL at T = 2 on the (k+1) buckets, the CE fused into the bucket pass). Peak memory: CUDA
max_memory_allocated, or on CPU the peak RSS (VmHWM) of a fresh process that runs that arm only. Targets: every position after the first (`--targets all`, the worst case for
distillation) or only the last `--answer-tokens` positions (answer-only distillation).

    python benchmarks/train_step.py --preset qwen2.5-1.5b --profile t4 --seq-len 1024 --batch-size 4   # GPU
    python benchmarks/train_step.py --preset tiny --seq-len 256 --batch-size 4                          # CPU
    python benchmarks/train_step.py --preset qwen1.5b-proxy --seq-len 256 --batch-size 4 --threads 1    # CPU proxy
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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
    # CPU proxies with Qwen's proportions (benchmarks/RESULTS.md, issue 14): hidden 256 and 28 layers, MLP 6x
    # hidden and 128-wide heads as in Qwen2.5-1.5B (intermediate 8960 = 5.8 x 1536, head_dim 128),
    # the vocabulary sized so that the LM head holds the real model's share of the parameters: 15.1 % for
    # Qwen2.5-1.5B (tied, 151,936 x 1536 of 1.54B), 1.7 % for Qwen2.5-72B (untied, 152,064 x 8192 of 72.7B).
    "qwen1.5b-proxy": dict(vocab_size=26880, hidden_size=256, intermediate_size=1536, num_hidden_layers=28,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
    "qwen72b-proxy": dict(vocab_size=2560, hidden_size=256, intermediate_size=1536, num_hidden_layers=28,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False),
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


def chunked_sft_loss(model, batch, chunk_size: int):
    """Plain CE on the labels, LM-head logits one chunk at a time (kdcache's chunked path at alpha = 1): the best
    SFT step a user gets from a Liger-style chunked loss."""
    loss, _ = chunked_distillation_loss(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"],
                                        None, batch["labels"], LossConfig(alpha=1.0), chunk_size=chunk_size,
                                        vocab_size=batch["vocab"])
    return loss


def kd_loss_checkpointed(model, batch, chunk_size: int):
    """kd_loss as it ran before the fused Function took the head's weight: the chunk under activation checkpointing,
    its whole forward (logits and loss passes) rerun in backward (what LoRA'd or soft-capped heads still do)."""
    import kdcache.train.objective as objective

    original = objective.linear_head_weight
    objective.linear_head_weight = lambda model: None
    try:
        return kd_loss(model, batch, chunk_size)
    finally:
        objective.linear_head_weight = original


def kd_loss_remade(model, batch, chunk_size: int):
    """kd_loss with a frozen head's gradient not made in forward: the fused Function keeps [n] statistics and
    remakes the chunk's logits in backward by one more matmul (the head path before kdcache.train.fused_linear)."""
    import kdcache.train.objective as objective

    original = objective.mix_coefficients
    objective.mix_coefficients = lambda *args: None
    try:
        return kd_loss(model, batch, chunk_size)
    finally:
        objective.mix_coefficients = original


def kd_loss(model, batch, chunk_size: int):
    loss, _ = chunked_distillation_loss(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"],
                                        batch["targets"], batch["labels"], LossConfig(kind="forward_kl", alpha=0.5,
                                                                                      temperature=TEMPERATURE),
                                        chunk_size=chunk_size, vocab_size=batch["vocab"])
    return loss


TEMPERATURE = 2.0  # --temperature: the KD arms' T
CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU seconds, all threads)


def timed_step(model, optimizer, scaler, precision, compute_loss) -> float:
    sync = torch.cuda.synchronize if precision.device.type == "cuda" else (lambda: None)
    sync()
    start = CLOCK()
    with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                        enabled=precision.autocast_dtype is not None):
        loss = compute_loss()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return CLOCK() - start


def _rss_peak_gib() -> float | None:
    """This process's resident-set high-water mark (VmHWM), GiB; None where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def peak_of(precision, fn) -> float | None:
    """CUDA peak of one call of fn (max_memory_allocated, GiB); None on CPU (see _cpu_peaks)."""
    if precision.device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def _cpu_peaks(argv: list[str], names: list[str]) -> dict[str, float | None]:
    """Peak RSS (VmHWM, GiB) of a fresh process that builds the student and runs two steps of one arm only, per
    arm: model + optimizer state + that step's transient peak. A process's RSS never shrinks reliably (the C
    allocator keeps freed pages), so one process per arm is the only fair RSS comparison."""
    import subprocess
    import sys

    peaks = {}
    for name in names:
        out = subprocess.run([sys.executable, __file__, *argv, "--peak-only", name], capture_output=True, text=True,
                             check=True).stdout
        peaks[name] = float(out.strip().splitlines()[-1])
    return peaks


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--versus-checkpointed", action="store_true",
                        help="add a fourth arm: KD with the chunk under activation checkpointing (the path before the "
                             "fused Function took the LM head's weight; LoRA'd or soft-capped heads still take it)")
    parser.add_argument("--versus-remade", action="store_true",
                        help="add an arm: KD with a frozen head's gradient remade in backward (one more head matmul "
                             "and the exp passes again), the path before kdcache.train.fused_linear")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="the KD arms' temperature (forward KL, alpha 0.5); at T = 1 the CE and the KL share "
                             "their softmax, at T != 1 each needs its own")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu (CPU device only): the process's CPU time, which other work on "
                             "a loaded machine disturbs far less than wall time (with --threads 1 the two agree on an "
                             "idle machine)")
    parser.add_argument("--lora-r", type=int, default=16, help="0 for full fine-tuning")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap this process's CUDA memory (e.g. 15 for a T4) with set_per_process_memory_fraction")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--skip-peak", action="store_true", help="on CPU, skip the per-arm peak RSS processes")
    parser.add_argument("--peak-only", choices=["sft", "sft_chunked", "kd", "kd_checkpointed", "kd_remade"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global CLOCK, TEMPERATURE
    TEMPERATURE = args.temperature
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

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
    steps = {"sft": lambda b: sft_loss(model, b), "sft_chunked": lambda b: chunked_sft_loss(model, b, args.chunk_size),
             "kd": lambda b: kd_loss(model, b, args.chunk_size)}
    if args.versus_checkpointed:
        steps["kd_checkpointed"] = lambda b: kd_loss_checkpointed(model, b, args.chunk_size)
    if args.versus_remade:
        steps["kd_remade"] = lambda b: kd_loss_remade(model, b, args.chunk_size)
    names = list(steps)
    if args.peak_only:  # a child of _cpu_peaks: two steps of one arm, then the process's peak RSS
        for _ in range(2):
            timed_step(model, optimizer, scaler, precision, lambda: steps[args.peak_only](batches[0]))
        print(_rss_peak_gib())
        return
    for name in names:  # warm-up (allocates the optimizer state), then peak memory of one step each
        timed_step(model, optimizer, scaler, precision, lambda fn=steps[name]: fn(batches[0]))
    peaks = {name: peak_of(precision, lambda fn=steps[name]: timed_step(model, optimizer, scaler, precision,
                                                                        lambda: fn(batches[0])))
             for name in names}
    if precision.device.type == "cpu" and _rss_peak_gib() is not None and not args.skip_peak:
        peaks = _cpu_peaks(sys.argv[1:] if argv is None else argv, names)
    times = {name: [] for name in names}
    for repeat in range(args.repeats):  # alternate, rotating the order, so drifts hit every arm alike
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            times[name].append(timed_step(model, optimizer, scaler, precision,
                                          lambda name=name, repeat=repeat: steps[name](batches[repeat % 2])))
    med = {name: statistics.median(times[name]) for name in names}
    tokens = args.batch_size * args.seq_len
    device = torch.cuda.get_device_name(0) if precision.device.type == "cuda" else platform.processor() or "cpu"
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    figures = {
        "preset": args.preset, "profile": args.profile, "device": device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "params": total, "lm_head_share": head / total,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "targets": args.targets, "k": args.k,
        "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing, "repeats": args.repeats,
        "clock": args.clock, "temperature": args.temperature,
        "peak_kind": "cuda max_memory_allocated" if precision.device.type == "cuda" else "peak RSS (VmHWM) of a process running that arm only",
        **{f"{name}_step_s": med[name] for name in names},
        **{f"{name}_tokens_per_s": tokens / med[name] for name in names},
        **{f"{name}_peak_gib": peaks[name] for name in names},
        **{f"{name}_times_s": times[name] for name in names},
        "kd_over_sft": med["kd"] / med["sft"], "kd_over_sft_chunked": med["kd"] / med["sft_chunked"],
    }
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset} "
          f"({total / 1e6:.1f}M params, LM head {100 * head / total:.1f} %), profile {args.profile}")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, targets={args.targets}, k={args.k}, "
          f"lora_r={args.lora_r}, T={args.temperature}, repeats={args.repeats}, clock {args.clock}; peak = {figures['peak_kind']}")
    print(f"{'':14}{'step (s)':>12}{'tokens/s':>12}{'peak GiB':>12}")
    labels = {"sft": "SFT (HF)", "sft_chunked": "SFT chunked", "kd": "KD", "kd_checkpointed": "KD ckpt", "kd_remade": "KD remade"}
    for name, label in ((name, labels[name]) for name in names):
        peak = figures[f"{name}_peak_gib"]
        print(f"{label:14}{med[name]:12.4f}{tokens / med[name]:12.0f}"
              f"{(f'{peak:.3f}' if peak is not None else 'n/a'):>12}")
    print(f"KD / SFT (transformers labels=) step time: {figures['kd_over_sft']:.3f}")
    print(f"KD / SFT (chunked CE) step time: {figures['kd_over_sft_chunked']:.3f}")
    if "kd_checkpointed" in med:
        figures["kd_over_kd_checkpointed"] = med["kd"] / med["kd_checkpointed"]
        print(f"KD / KD checkpointed step time: {figures['kd_over_kd_checkpointed']:.3f}   "
              f"(checkpointed KD / SFT (transformers): {med['kd_checkpointed'] / med['sft']:.3f})")
    if "kd_remade" in med:
        figures["kd_over_kd_remade"] = med["kd"] / med["kd_remade"]
        print(f"KD / KD remade step time: {figures['kd_over_kd_remade']:.3f}   "
              f"(remade KD / SFT (transformers): {med['kd_remade'] / med['sft']:.3f})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
