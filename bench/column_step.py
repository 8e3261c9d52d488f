"""The DKVB value step on the CPU as it was before its rows were handled whole: bench/bottleneck_step.py's
reference for workloads/sparse_step.py (the same phases, the same sums in the same orders, so the same bits).

Each phase walks the selected rows of a codebook one class column at a time, in scalar numba loops: the first
column's loop misses the cache on every row, the next ones find the rows in cache. Kept here, not in workloads/,
as the named reference the bench measures the current step against in the same run.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from workloads import compiled
from workloads.sparse_step import BLOCKS

_workspace: dict = {}
_NO_COUNTS = np.zeros(0, np.int64)


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
            "runs": np.array([blocks * t // threads for t in range(threads + 1)], np.int64),  # part t's blocks
            "ok": np.ones(threads, np.bool_),  # part t's key indices all in [0, K)
        }
    return ws


def sparse_sgd_step(values: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float | None,
                    label_smoothing: float, usage: torch.Tensor | None = None) -> float:
    """sparse_step.sparse_sgd_step as it was, class column by class column (same arguments, same bits)."""
    b, c, k = idx.shape
    num_keys, d = values.shape[1], values.shape[2]
    table = values.detach().numpy().reshape(-1, d)  # (C * K, d_v) rows, a view (supports: rows evenly spaced)
    sel = idx.numpy() if idx.is_contiguous() else idx.contiguous().numpy()
    labels = y.numpy() if y.dtype == torch.int64 else y.long().numpy()
    counts = usage.view(-1).numpy() if usage is not None else _NO_COUNTS
    blocks = min(BLOCKS, c)
    threads = min(compiled.threads(), blocks)
    ws = _buffers(b, c, k, d, num_keys, threads)
    edges, partials, dlogits, acc = ws["edges"], ws["partials"], ws["dlogits"], ws["acc"]
    keys, runs, ok = ws["keys"], ws["runs"], ws["ok"]
    if threads > 1:  # (one thread: the phases called as they are, and numba starts no threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        logits_parts(table, sel, num_keys, edges, runs, keys, partials, ok)
    else:
        ok[0] = block_logits(table, sel, num_keys, edges, 0, blocks, keys, partials)
    if not ok.all():
        raise IndexError("sparse_sgd_step: a key index lies outside [0, K)")
    loss, squares = vote_loss(partials, labels, c * k, label_smoothing, dlogits)
    step = np.float32(lr)
    # Clipping, as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) where that is below 1.
    # A row's gradient sums at most b * k of its codebook's b * k selections, so by Cauchy-Schwarz
    # norm^2 <= C * b * k^2 * sum(dlogits^2): where that bound (with a margin for rounding) cannot reach
    # max_norm the scale is 1 and the norm need not be computed (at the paper's sizes, never: dlogits are
    # divided by b * C * k, so that bound on norm^2 is at most 2 / C).
    if grad_clip is not None and np.sqrt(c * b * k * k * squares) * (1 + 1e-4) + 1e-6 > grad_clip:
        norms = ws["norms"]
        if threads > 1:
            norm_parts(keys, k, dlogits, edges, runs, acc, norms)
        else:
            block_norm(keys, k, dlogits, edges, 0, blocks, acc[0], norms)
        step = np.float32(lr * min(1.0, grad_clip / (np.sqrt(norms.sum()) + 1e-6)))
    if threads > 1:
        update_parts(table, keys, k, num_keys, dlogits, edges, runs, acc, step, counts)
    else:
        block_update(table, keys, k, num_keys, dlogits, edges, 0, blocks, acc[0], step, counts)
    return float(loss)


# --- its compiled loops ---

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
    # cache misses in flight, the next ones find the rows in cache. Returns False, having read no value,
    # where a key index lies outside [0, K) (the caller raises: a parallel part cannot).
    b, _, k = idx.shape
    d = table.shape[1]
    for s in range(b):
        for h in range(edges[i0], edges[i1]):
            for j in range(k):
                key = idx[s, h, j]
                if key < 0 or key >= num_keys:  # before any value is read or written
                    return False
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
    return True


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


# The same phases over contiguous runs of blocks at once, runs[t]..runs[t + 1] - 1 for each part t, on numba's
# threads: waking them costs less than a Python pool's hand-off, twice a step (bench/bottleneck_step.py, paper
# sizes, 2 cores, numba's OpenMP layer: a step 1.22x and 1.48x faster, an epoch 1.03x and 1.14x, in two runs).
# They are module functions, not closures, so that numba's cache keeps them (a parallel closure compiles anew
# in every process, ~4 s).
par = numba.njit(nogil=True, cache=True, boundscheck=False, parallel=True)


@par
def logits_parts(table, idx, num_keys, edges, runs, keys, partials, ok):
    for t in numba.prange(len(runs) - 1):
        ok[t] = block_logits(table, idx, num_keys, edges, runs[t], runs[t + 1], keys, partials)


@par
def norm_parts(keys, k, dlogits, edges, runs, acc, norms):
    for t in numba.prange(len(runs) - 1):
        block_norm(keys, k, dlogits, edges, runs[t], runs[t + 1], acc[t], norms)


@par
def update_parts(table, keys, k, num_keys, dlogits, edges, runs, acc, step, usage):
    for t in numba.prange(len(runs) - 1):
        block_update(table, keys, k, num_keys, dlogits, edges, runs[t], runs[t + 1], acc[t], step, usage)
