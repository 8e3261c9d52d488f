"""The DKVB value-training step on the CPU as compiled loops (numba): one pass per phase, codebook by codebook.

What it computes is bottleneck.sparse_sgd_step's step (SGD on the vote decoder's cross entropy, reading and
writing only the selected value rows, gradient clipped by its norm); this is its CPU implementation, and the
torch one stays for other devices and dtypes.

Why compiled loops: at the paper's sizes a step selects 65,536 value rows (batch 256 x C=256 codebooks) of a
40 MB table, and the step's time is the cache misses of reading and writing them (the bottleneck pads each
40-byte row to its own 64-byte cache line, bottleneck.value_table: one miss a row instead of 1.5). Torch's
gather, sort, sparse product and scatter walk the rows in sample order, one kernel after another. Here each phase walks them codebook
by codebook, one class column at a time: the first column's loop is short enough to keep many misses in
flight, the others find the codebook's rows in cache, gradients are summed in a (d_v, K) buffer that stays in
cache, and nothing of the batch's size is sorted.

Phases of one step (b samples, C codebooks, k keys each, d_v classes):
  1. logits: per block of codebooks, the sum of the selected values (d_v, b), in float64;
  2. loss and dlogits from the blocks' sums added in block order (the vote decoder's mean over C * k values);
  3. the gradient's norm, only where clipping could act (see the bound in sparse_sgd_step);
  4. update: per codebook, in reverse (the rows read last are the likeliest in cache), each selected key's
     gradient summed over its samples in sample order, then its row minus lr x clip scale x that gradient.
Blocks are a fixed partition of the codebooks (BLOCKS of them), whatever the thread count, and their partial
sums are added in block order: the result does not depend on how many threads ran the blocks. With more than
one thread (torch's count), phases 1, 3 and 4 run contiguous runs of blocks at once (workloads.compiled).

numba compiles the loops at their first call in a process (about 2 s) and caches the machine code beside this
file (or in numba's user cache where that is read-only), so later processes load them in well under a second.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from workloads import compiled

# Codebooks are split into this many blocks; each block's partial sums are kept apart and added in order.
BLOCKS = 8

_workspace: dict = {}
_lock = threading.Lock()
_NO_COUNTS = np.zeros(0, np.int64)


@functools.cache
def _compile():
    """The phases as numba functions, made at the first step of a process (importing numba costs about half a
    second). Each runs blocks i0..i1-1 of the codebooks, block i being codebooks edges[i]..edges[i+1]-1."""
    import numba

    jit = numba.njit(nogil=True, cache=True, boundscheck=False)

    @jit
    def scatter_add(a, keys, g, k):
        # a[keys[s * k + j]] += g[s] for every sample s and selection j, in that order
        if k == 1:
            for s in range(len(g)):
                a[keys[s]] += g[s]
        else:
            for s in range(len(g)):
                for j in range(s * k, s * k + k):
                    a[keys[j]] += g[s]

    @jit
    def block_logits(table, idx, num_keys, edges, i0, i1, keys, partials):
        # keys[h] (b * k,) := codebook h's selections, sample-major (read once here, in idx's own order, and
        # contiguous for the phases after); partials[i] (d_v, b) float64 := the sum of the value rows block i's
        # codebooks select. One class column at a time: the first column's loop is tight enough to keep many
        # cache misses in flight, the next ones find the rows in cache.
        b, _, k = idx.shape
        d = table.shape[1]
        for s in range(b):
            for h in range(edges[i0], edges[i1]):
                for j in range(k):
                    key = idx[s, h, j]
                    if key < 0 or key >= num_keys:  # before any value is read or written
                        raise IndexError("sparse_sgd_step: a key index lies outside [0, K)")
                    keys[h, s * k + j] = key
        for i in range(i0, i1):
            out = partials[i]
            out[:] = 0.0
            for h in range(edges[i], edges[i + 1]):
                rows = table[h * num_keys:(h + 1) * num_keys]
                sel = keys[h]
                for v in range(d):
                    col = out[v]
                    if k == 1:  # the tight loop of top-1 (no inner loop, no division per element)
                        for s in range(b):
                            col[s] += rows[sel[s], v]
                    else:
                        for s in range(b):
                            for j in range(s * k, s * k + k):
                                col[s] += rows[sel[j], v]

    @jit
    def vote_loss(partials, y, entries, smoothing, dlogits):
        # logits = the blocks' partials added in block order / entries (C * k); dlogits (d_v, b) float32 := the
        # gradient reaching each selected value, (softmax - target) / (b * C * k); returns the mean loss and
        # the sum of the squared dlogits
        nb, d, b = partials.shape
        off = smoothing / d
        loss, squares = 0.0, 0.0
        logits = np.empty(d)
        for s in range(b):
            if y[s] < 0 or y[s] >= d:
                raise IndexError("sparse_sgd_step: a label lies outside [0, d_v)")
            for v in range(d):
                total = 0.0
                for i in range(nb):
                    total += partials[i, v, s]
                logits[v] = np.float32(total / entries)  # the logits as float32, as the decoder gives them
            top = logits.max()
            z = 0.0
            for v in range(d):
                z += np.exp(logits[v] - top)
            lse = top + np.log(z)
            for v in range(d):
                target = off + (1.0 - smoothing if v == y[s] else 0.0)
                logp = logits[v] - lse
                loss -= target * logp
                g = np.float32((np.exp(logp) - target) / (b * entries))
                dlogits[v, s] = g
                squares += np.float64(g) * g
        return loss / b, squares

    @jit
    def block_norm(keys, k, dlogits, edges, i0, i1, acc, norms):
        # norms[i] := the squared norm of block i's value gradient, each selected key's gradient being the sum
        # of its samples' dlogits in sample order; acc (d_v, K) float32 is all zero on entry and on return
        d = dlogits.shape[0]
        for i in range(i0, i1):
            sq = 0.0
            for h in range(edges[i], edges[i + 1]):
                sel = keys[h]
                for v in range(d):
                    a, g = acc[v], dlogits[v]
                    scatter_add(a, sel, g, k)
                    part = 0.0
                    for e in range(len(sel)):  # each key's sum read at its first selection; the zero left adds 0
                        x = np.float64(a[sel[e]])
                        part += x * x
                        a[sel[e]] = 0.0
                    sq += part
            norms[i] = sq

    @jit
    def block_update(table, keys, k, num_keys, dlogits, edges, i0, i1, acc, step, usage):
        # every selected row minus step x its gradient (summed as block_norm sums it); a row selected twice is
        # written at its first selection, then minus step x 0 (unchanged); acc as in block_norm. Codebooks in
        # reverse: the last ones block_logits read are the likeliest still in this core's cache. usage (C * K,)
        # int64 += 1 per selection, unless it is empty.
        d = table.shape[1]
        count = len(usage) > 0
        for h in range(edges[i1] - 1, edges[i0] - 1, -1):
            rows = table[h * num_keys:(h + 1) * num_keys]
            sel = keys[h]
            for v in range(d):
                a, g = acc[v], dlogits[v]
                scatter_add(a, sel, g, k)
                for e in range(len(sel)):
                    key = sel[e]
                    rows[key, v] -= step * a[key]
                    a[key] = 0.0
            if count:
                counts = usage[h * num_keys:(h + 1) * num_keys]
                for e in range(len(sel)):
                    counts[sel[e]] += 1

    return block_logits, vote_loss, block_norm, block_update


def supports(values: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether this step can run on these tensors: a float32 (C, K, d_v) table on the CPU whose rows are evenly
    spaced (contiguous, or each row padded: see bottleneck.value_table)."""
    return (values.device.type == "cpu" and idx.device.type == "cpu" and values.dtype == torch.float32
            and values.dim() == 3 and values.stride(2) == 1 and values.stride(1) >= values.shape[2]
            and values.stride(0) == values.shape[1] * values.stride(1))


def _buffers(b: int, c: int, k: int, d: int, num_keys: int, threads: int) -> dict:
    """Scratch arrays for one shape, kept between steps (fresh large arrays each step cost page faults)."""
    key = (b, c, k, d, num_keys, threads)
    ws = _workspace.get(key)
    if ws is None:
        _workspace.clear()
        blocks = min(BLOCKS, c)
        ws = _workspace[key] = {
            "edges": np.linspace(0, c, blocks + 1).astype(np.int64),
            "partials": np.zeros((blocks, d, b)),
            "norms": np.zeros(blocks),
            "dlogits": np.empty((d, b), np.float32),
            "acc": np.zeros((threads, d, num_keys), np.float32),  # one per thread
            "keys": np.empty((c, b * k), np.int32),  # the batch's selections, codebook-major
        }
    return ws


def _in_parallel(fn, head: tuple, tail: tuple, blocks: int, threads: int, acc: np.ndarray | None = None) -> None:
    """fn(*head, i0, i1, [acc[t],] *tail) for `threads` contiguous runs i0..i1-1 of the blocks, at once (run t
    gets acc[t] when acc is given)."""
    runs = [blocks * t // threads for t in range(threads + 1)]
    compiled.run_parts(lambda t: fn(*head, runs[t], runs[t + 1], *((acc[t],) if acc is not None else ()), *tail),
                       threads)


def sparse_sgd_step(values: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float | None,
                    label_smoothing: float, usage: torch.Tensor | None = None) -> float:
    """bottleneck.sparse_sgd_step on the CPU: values (C, K, d_v) float32 updated in place, idx (B, C, k) int32 or
    int64 key indices, y (B,) labels; returns the batch's mean loss. With `usage` (C, K) int64, every selection
    is also counted there."""
    block_logits, vote_loss, block_norm, block_update = _compile()
    b, c, k = idx.shape
    num_keys, d = values.shape[1], values.shape[2]
    table = values.detach().numpy().reshape(-1, d)  # (C * K, d_v) rows, a view (supports: rows evenly spaced)
    sel = idx.numpy() if idx.is_contiguous() else idx.contiguous().numpy()
    labels = y.numpy() if y.dtype == torch.int64 else y.long().numpy()
    counts = usage.view(-1).numpy() if usage is not None else _NO_COUNTS
    with _lock:  # one step at a time per process: the scratch arrays are shared
        blocks = min(BLOCKS, c)
        threads = min(compiled.threads(), blocks)
        ws = _buffers(b, c, k, d, num_keys, threads)
        edges, partials, dlogits, acc = ws["edges"], ws["partials"], ws["dlogits"], ws["acc"]
        keys = ws["keys"]
        _in_parallel(block_logits, (table, sel, num_keys, edges), (keys, partials), blocks, threads)
        loss, squares = vote_loss(partials, labels, c * k, label_smoothing, dlogits)
        step = np.float32(lr)
        # Clipping, as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) where that is below 1.
        # A row's gradient sums at most b * k of its codebook's b * k selections, so by Cauchy-Schwarz
        # norm^2 <= C * b * k^2 * sum(dlogits^2): where that bound (with a margin for rounding) cannot reach
        # max_norm the scale is 1 and the norm need not be computed (at the paper's sizes, never: dlogits are
        # divided by b * C * k, so that bound on norm^2 is at most 2 / C).
        if grad_clip is not None and np.sqrt(c * b * k * k * squares) * (1 + 1e-4) + 1e-6 > grad_clip:
            norms = ws["norms"]
            _in_parallel(block_norm, (keys, k, dlogits, edges), (norms,), blocks, threads, acc)
            step = np.float32(lr * min(1.0, grad_clip / (np.sqrt(norms.sum()) + 1e-6)))
        _in_parallel(block_update, (table, keys, k, num_keys, dlogits, edges), (step, counts), blocks, threads,
                     acc)
    return float(loss)
