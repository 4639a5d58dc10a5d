"""Memory meters, the one home of each: the peak of a training run (`MemoryMeter`), the peak of a block of
work (`PeakMemory`), and this process's RSS (`peak_rss`, `current_rss`); peft_train and the benchmarks use them.

A training run's peak:

CUDA: the allocator's own peak (``torch.cuda.max_memory_allocated``). CPU has no allocator statistics that can
be reset per run (the process RSS only ever grows and counts everything else in the process), so there we add up
what training holds: weights (+ 4-bit state), gradients, optimizer state and the largest set of activations
saved for backward in any step (seen through ``saved_tensors_hooks``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence

import torch


def _storage_bytes(tensors: Iterable, seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _quant_state_tensors(module: torch.nn.Module):
    """The tensors a bitsandbytes 4-bit weight keeps beside its packed bytes (absmax, nested absmax, code)."""
    for param in module.parameters(recurse=True):
        state = getattr(param, "quant_state", None)
        while state is not None:
            yield from (state.absmax, getattr(state, "code", None), getattr(state, "offset", None))
            state = getattr(state, "state2", None)


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters, buffers and 4-bit quantisation state (shared storages counted once)."""
    seen: set[int] = set()
    return (
        _storage_bytes(model.parameters(), seen)
        + _storage_bytes(model.buffers(), seen)
        + _storage_bytes(_quant_state_tensors(model), seen)
    )


def _grad_bytes(params: Sequence[torch.nn.Parameter]) -> int:
    # Trainer frees gradients between steps (zero_grad(set_to_none)); at its peak each trainable parameter has one
    return sum(p.numel() * p.element_size() for p in params)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = (v for state in optimizer.state.values() for v in state.values())
    return _storage_bytes(tensors, set())


class MemoryMeter:
    """Peak training memory of ``model`` on ``device`` (see the module docstring for what is counted where)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.on_cuda = device.type == "cuda"
        self.max_activation_bytes = 0
        self._step_bytes = 0
        self._seen: set[int] = set()
        if self.on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    @property
    def measure(self) -> str:
        return "cuda_max_allocated" if self.on_cuda else "tensor_accounting"

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._step_bytes += _storage_bytes((tensor,), self._seen)
        return tensor

    def saving_activations(self):
        """Context for one forward pass: counts the bytes autograd saves for backward (CPU only)."""
        self._step_bytes, self._seen = 0, set()
        if self.on_cuda:
            return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def end_step(self) -> None:
        self.max_activation_bytes = max(self.max_activation_bytes, self._step_bytes)
        self._seen = set()

    def peak(self, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return (
            model_memory_bytes(self.model)
            + _grad_bytes(params)
            + _optimizer_state_bytes(optimizer)
            + self.max_activation_bytes
        )


class PeakMemory:
    """Peak memory while a block runs: CUDA max_memory_allocated, or on CPU the peak RSS above the start.

    On CPU the kernel's own high-water mark is reset at the start (`/proc/self/clear_refs` "5", Linux >= 4.0)
    and read at the end, so even an allocation that lives for a microsecond is seen; RSS is also sampled every
    20 ms, which covers kernels that refuse the reset and blocks nested in this one (a nested block's reset
    records the mark it erased, and enclosing blocks take it into account)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        import psutil
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.proc = psutil.Process()
        self.exact = _reset_high_water_mark()
        self._erased_from = len(_ERASED_MARKS)   # marks erased from now on were set inside this block
        self.base = self.proc.memory_info().rss
        self.peak = self.base

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self.proc.memory_info().rss)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self.thread.join()
            marks = [peak_rss()] if self.exact else []
            self.peak = max([self.peak, self.proc.memory_info().rss, *marks, *_ERASED_MARKS[self._erased_from:]])
        self.delta = self.peak - self.base
        return False


_ERASED_MARKS: list[int] = []   # the high-water marks that resets erased (for enclosing PeakMemory blocks)


def _reset_high_water_mark() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    erased = peak_rss()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    _ERASED_MARKS.append(erased)
    return True


def peak_rss() -> int:
    """This process's peak RSS (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which a child started by
    fork + exec inherits from its parent)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
