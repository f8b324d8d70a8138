"""Speed and memory measured the same way for every model: batch wall time shared by the batch's examples."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from kdcache.eval.metrics import percentile


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: list[float]):
    """Append the wall time of the block to `into`, waiting for queued GPU work before and after."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    into.append(time.perf_counter() - start)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on the GPU since the last reset (weights included), or None off CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def speed_summary(latencies: list[float], total_seconds: float, batch_size: int, device: torch.device,
                  peak_bytes: int | None, warmup: bool) -> dict:
    """Mean and p95 of per-example latency, throughput over the timed batches, peak GPU memory."""
    return {
        "latency_mean_s": sum(latencies) / len(latencies),
        "latency_p95_s": percentile(latencies, 95),
        "throughput_per_s": len(latencies) / total_seconds if total_seconds > 0 else None,
        "total_s": total_seconds,
        "peak_gpu_memory_bytes": peak_bytes,
        "batch_size": batch_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "warmup_batch": warmup,
    }
