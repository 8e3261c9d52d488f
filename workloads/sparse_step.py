"""The DKVB value-training step on the CPU as compiled loops (numba): one pass per phase, codebook by codebook.

What it computes is bottleneck.sparse_sgd_step's step (SGD on the vote decoder's cross entropy, reading and
writing only the selected value rows, gradient clipped by its norm); this is its CPU implementation, and the
torch one stays for other devices and dtypes.

Why compiled loops: at the paper's sizes a step selects 65,536 value rows (batch 256 x C=256 codebooks) of a
40 MB table (67 MB in padded rows), and the step's time is reading and writing them at random places (the
bottleneck pads each 40-byte row to its own 64-byte cache line, bottleneck.value_table: one miss a row instead
of 1.5). Torch's gather, sort, sparse product and scatter walk the rows in sample order, one kernel after
another. Here each phase walks them codebook by codebook: a row is read or written whole, LANES floats per
vector operation (workloads/sparse_loops.py says why numba's scalar loops did not do), while the lines of the
next codebook's rows are prefetched, so that their cache misses overlap this codebook's work; gradients are
summed in a (K, width) buffer that stays in cache, and nothing of the batch's size is sorted. (Class column by
class column in scalar loops, as before, an epoch of a paper CIFAR-10 stage took 1.57x as long, 0.0655 s
against 0.0418 s, in turns in one run of bench/bottleneck_step.py, which keeps that step as
bench/column_step.py.)

Phases of one step (b samples, C codebooks, k keys each, d_v classes):
  1. logits: per block of codebooks, the sum of the selected values (b, d_v), in float64;
  2. loss and dlogits from the blocks' sums added in block order (the vote decoder's mean over C * k values);
  3. the gradient's norm, only where clipping could act (see the bound in sparse_sgd_step);
  4. update: per codebook, in reverse (the rows read last are the likeliest in cache), each selected key's
     gradient summed over its samples in sample order, then its row minus lr x clip scale x that gradient.
Every float is summed in the same order as by the class-column loops before (per class: codebooks in order,
samples in order), so the values have their bits. Blocks are a fixed partition of the codebooks (BLOCKS of
them), whatever the thread count, and their partial sums are added in block order: the result does not depend
on how many threads ran the blocks. With more than one thread (torch's count), phases 1, 3 and 4 run contiguous
runs of blocks at once, as a parallel loop over the runs on numba's own threads (its threading layer: OpenMP
where present); one step at a time per process.

numba compiles the loops (workloads/sparse_loops.py) at their first call in a process (about 5 s) and caches the
machine code beside that file (or in numba's user cache where that is read-only), so later processes load them
in under a second.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from workloads import compiled

# Codebooks are split into this many blocks; each block's partial sums are kept apart and added in order.
BLOCKS = 8
# Floats of one vector operation on a value row (sparse_loops' intrinsics).
LANES = 8

_workspace: dict = {}
_lock = threading.Lock()
_NO_COUNTS = np.zeros(0, np.int64)


def supports(values: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether this step can run on these tensors: a float32 (C, K, d_v) table on the CPU whose rows are evenly
    spaced (contiguous, or each row padded: see bottleneck.value_table)."""
    return (values.device.type == "cpu" and idx.device.type == "cpu" and values.dtype == torch.float32
            and values.dim() == 3 and values.stride(2) == 1 and values.stride(1) >= values.shape[2]
            and values.stride(0) == values.shape[1] * values.stride(1))


def row_width(d: int, stride: int) -> int:
    """Floats of a value row the loops read and write: d rounded up to whole LANES where the row's padding (its
    stride) holds them, else d (the last LANES-short part then float by float)."""
    wide = -(-d // LANES) * LANES
    return wide if wide <= stride else d


def _buffers(b: int, c: int, k: int, d: int, width: int, num_keys: int, threads: int) -> dict:
    """Scratch arrays for one shape, kept between steps (fresh large arrays each step cost page faults)."""
    key = (b, c, k, d, width, num_keys, threads)
    ws = _workspace.get(key)
    if ws is None:
        _workspace.clear()
        blocks = min(BLOCKS, c)
        ws = _workspace[key] = {
            "edges": np.linspace(0, c, blocks + 1).astype(np.int64),
            "partials": np.zeros((blocks, b, width)),
            "norms": np.zeros(blocks),
            "dlogits": np.zeros((b, width), np.float32),  # lanes d: stay zero
            "acc": np.zeros((threads, num_keys, width), np.float32),  # one per thread
            "keys": np.empty((c, b * k), np.int32),  # the batch's selections, codebook-major
            "runs": np.array([blocks * t // threads for t in range(threads + 1)], np.int64),  # part t's blocks
            "ok": np.ones(threads, np.bool_),  # part t's key indices all in [0, K)
        }
    return ws


def sparse_sgd_step(values: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float | None,
                    label_smoothing: float, usage: torch.Tensor | None = None) -> float:
    """bottleneck.sparse_sgd_step on the CPU: values (C, K, d_v) float32 updated in place, idx (B, C, k) int32 or
    int64 key indices, y (B,) labels; returns the batch's mean loss. With `usage` (C, K) int64, every selection
    is also counted there."""
    import numba

    from workloads import sparse_loops as loops  # compiled (or loaded from numba's cache) at the first step

    b, c, k = idx.shape
    num_keys, d = values.shape[1], values.shape[2]
    width = row_width(d, values.stride(1))
    # (C * K, width) rows, a view of the table's memory, padding included (supports: rows evenly spaced)
    table = values.detach().as_strided((c * num_keys, width), (values.stride(1), 1)).numpy()
    sel = idx.numpy() if idx.is_contiguous() else idx.contiguous().numpy()
    labels = y.numpy() if y.dtype == torch.int64 else y.long().numpy()
    counts = usage.view(-1).numpy() if usage is not None else _NO_COUNTS
    with _lock:  # one step at a time per process: the scratch arrays (and numba's thread pool) are shared
        blocks = min(BLOCKS, c)
        threads = min(compiled.threads(), blocks)
        ws = _buffers(b, c, k, d, width, num_keys, threads)
        edges, partials, dlogits, acc = ws["edges"], ws["partials"], ws["dlogits"], ws["acc"]
        keys, runs, ok = ws["keys"], ws["runs"], ws["ok"]
        if threads > 1:  # (one thread: the phases called as they are, and numba starts no threads)
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            loops.logits_parts(table, sel, num_keys, edges, runs, keys, partials, ok, width)
        else:
            ok[0] = loops.block_logits(table, sel, num_keys, edges, 0, blocks, keys, partials, width)
        if not ok.all():
            raise IndexError("sparse_sgd_step: a key index lies outside [0, K)")
        loss, squares = loops.vote_loss(partials, labels, c * k, label_smoothing, dlogits, d)
        step = np.float32(lr)
        # Clipping, as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) where that is below 1.
        # A row's gradient sums at most b * k of its codebook's b * k selections, so by Cauchy-Schwarz
        # norm^2 <= C * b * k^2 * sum(dlogits^2): where that bound (with a margin for rounding) cannot reach
        # max_norm the scale is 1 and the norm need not be computed (at the paper's sizes, never: dlogits are
        # divided by b * C * k, so that bound on norm^2 is at most 2 / C).
        if grad_clip is not None and np.sqrt(c * b * k * k * squares) * (1 + 1e-4) + 1e-6 > grad_clip:
            norms = ws["norms"]
            if threads > 1:
                loops.norm_parts(keys, k, dlogits, d, edges, runs, acc, norms, width)
            else:
                loops.block_norm(keys, k, dlogits, d, edges, 0, blocks, acc[0], norms, width)
            step = np.float32(lr * min(1.0, grad_clip / (np.sqrt(norms.sum()) + 1e-6)))
        if threads > 1:
            loops.update_parts(table, keys, k, num_keys, dlogits, edges, runs, acc, step, counts, width)
        else:
            loops.block_update(table, keys, k, num_keys, dlogits, edges, 0, blocks, acc[0], step, counts, width)
    return float(loss)
