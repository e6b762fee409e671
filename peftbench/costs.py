"""What a run costs besides its accuracy: its peak memory, measured per run (:class:`PeakMemory`).

The other costs are measured by the trainer (median step time, tokens/s, training time) and by the
exporter (:func:`peftbench.export.adapter_file_bytes`, the adapter's size on disk).

**Peak memory on a GPU** is ``torch.cuda.max_memory_allocated()``, its counter reset when the run's setup
ends (``mem_kind = "cuda_max_allocated"``): the weights, gradients, optimizer state and activations the
run's tensors held at their peak.

**Peak memory on a CPU** (``mem_kind = "cpu_peak_rss_delta"``) is the process' peak resident set size
(RSS) during the run minus its RSS when the run started (after a garbage collection): what the run added
to the process, its model weights included. Why not the alternatives:

* ``ru_maxrss`` alone (what was stored before) is the process' peak since it started: monotone over a
  sweep, so every run after the first inherits the largest earlier run's peak.
* :class:`peftbench.memory.TrainMemoryProbe` (the benchmarks' account) adds up tensors and is exact for
  what it counts, but it hooks every saved activation (a cost inside each step) and leaves out what is not
  a tensor the trainer can see (allocator slack, data, the tokenizer).

RSS is sampled from ``/proc/self/statm`` by a daemon thread every ``interval`` seconds (50 ms): one small
read, no synchronisation with training, so it does not slow a step measurably. A spike shorter than the
interval may be missed, except where the run sets the process' record peak: then ``ru_maxrss``, which the
kernel keeps exactly, is used. Memory the allocator kept from an earlier run and reuses is not counted as
this run's again (it is in the baseline): a run after a larger one may read a little low. The first run of a
process also carries one-time costs (libraries loaded lazily, thread pools: tens of MiB).
Without ``/proc`` (not Linux) it falls back to the old ``cpu_process_max_rss``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading

#: ``mem_kind`` values, for table footers
MEM_KINDS = {
    "cuda_max_allocated": "GPU: torch.cuda.max_memory_allocated over the run",
    "cpu_peak_rss_delta": "CPU: the process' peak RSS over the run minus its RSS at the run's start",
    "cpu_process_max_rss": "CPU: the process' peak RSS since it started (not per run)",
}

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _release_free_heap() -> None:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim``), so that what a run allocates shows as
    RSS growth instead of reusing an earlier run's freed blocks; nothing where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int | None:
    """The process' resident set size now (Linux ``/proc/self/statm``), ``None`` where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available()


def max_rss_bytes() -> int:
    """The process' peak RSS since it started (``ru_maxrss``: kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """The peak memory of one run: a context manager around the run, read with :meth:`peak` at its end.

    ``cpu``: the run trains on the CPU (else on the GPU, where CUDA's own peak counter is read).
    """

    def __init__(self, cpu: bool, interval: float = 0.05):
        self.cpu, self.interval = cpu, interval
        self.start = self.highest = self.record = 0
        #: the memory in use at every sample (above ``start`` on the CPU), for the average and 99th percentile
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cpu and rss_bytes() is not None:
            gc.collect()  # an earlier run's garbage is not part of this run's baseline
            _release_free_heap()  # memory malloc keeps for reuse would hide this run's allocations from the RSS
            self.start = self.highest = rss_bytes()
            self.record = max_rss_bytes()
        elif self.cpu or not _cuda_ready():
            return self
        self._thread = threading.Thread(target=self._sample, name="peftbench-peak-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            if self.cpu:
                now = rss_bytes() or 0
                self.highest = max(self.highest, now)
                self.samples.append(max(now - self.start, 0))
            else:  # reading the allocator's counter needs no synchronisation with the training stream
                import torch

                self.samples.append(torch.cuda.memory_allocated())

    def stats(self) -> dict[str, int] | None:
        """Average and 99th percentile of the sampled memory in use (what HF PEFT's method comparison reports
        beside the maximum); ``None`` when nothing was sampled (a run shorter than one interval)."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return {"avg": int(sum(ordered) / len(ordered)), "p99": ordered[min(len(ordered) - 1,
                                                                             int(0.99 * len(ordered)))],
                "samples": len(ordered)}

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.highest = max(self.highest, rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        self.stop()

    def peak(self) -> tuple[int, str]:
        """``(bytes, mem_kind)`` of the run so far; on the CPU it also stops the sampling."""
        if not self.cpu:
            import torch

            return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
        if not self.start:
            return max_rss_bytes(), "cpu_process_max_rss"
        self.stop()
        record = max_rss_bytes()
        if record > self.record:  # the run set the process' record: the kernel's exact peak beats sampling
            self.highest = max(self.highest, record)
        return self.highest - self.start, "cpu_peak_rss_delta"
