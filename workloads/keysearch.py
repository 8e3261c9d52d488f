"""Exact nearest-key search: the one place where inputs meet codebooks (key learning, lookups, the index cache,
evaluation).

Distance: squared Euclidean, ranked by score(z, key) = ||key||^2 - 2 z.key (||z||^2 is the same for every key of
a head, so it cannot change the ranking), computed as one dot product of [z, 1] with [-2 key, ||key||^2].

Tie rule: among keys at equal score the LOWEST key index wins, for top-1 and top-k alike, and the k results are
in (score, index) order. A key that `allowed` masks scores +inf, so it ranks after every allowed key: where a
codebook has fewer than k allowed keys, the remaining places go to masked keys, lowest index first.

Shapes: z (B, C, d_k) inputs, keys (C, K, d_k) codebooks, allowed (C, K) bool; results (B, C, k) int64.

Scores are never materialised for all keys and samples at once. On the CPU in float32 they are made in vector
registers by workloads.score_kernel, W inputs at a time, and used as they come: top-1 keeps each input's first
minimum, top-k each input's k best so far (nothing is stored). A score there is computed the same way (D - 1
FMAs onto one product, in coordinate order), whatever else shares its block: searches of the same z for top-1,
for top-m candidates or under a mask rank keys by bit-identical scores (what candidate reuse at evaluation
relies on). Elsewhere (a GPU, other dtypes, a key dimension above score_kernel.MAX_DIM, or no kernel
compiled) a tile of (heads, K, samples) scores is made by bmm in one buffer, reused for every tile; there
exactness relies on the matrix kernel giving a score the same bits whatever else is in its tile (MKL's CPU
kernels do, and give the score kernel's bits; tests/test_keysearch.py runs its search tests on both paths, and
the DKVB reuse tests check answers against full searches).

On the CPU the heads are split into as many parts as torch has threads, searched at once, each on one thread
with buffers of its own. For the call's duration torch's thread count is 1: torch work on another Python thread
of the process would run on one thread meanwhile.
"""
from __future__ import annotations

import functools
import weakref

import numpy as np
import torch

from workloads import compiled, score_kernel

# Floats in one score tile. CPU: 4 MiB, reduced while still in cache (against 1, 2 and 8 MiB at the paper's
# sizes: 1 MiB lost to per-call cost, 2 and 8 MiB were within noise). GPU: large tiles, so that one kernel
# launch does plenty of work.
TILE_FLOATS = {"cpu": 2**20, "cuda": 2**26}
# Top-1 reduces a tile in two steps: the minimum of each block of this many keys (a vectorised pass over the
# tile), then the first minimum inside the winning block only.
KEY_BLOCK = 64
# Top-k ranks only the k blocks with the smallest minima; smaller blocks leave fewer scores to rank but more
# minima to choose from: 32 was fastest at K=4096, k=16 (against 8, 16 and 64).
TOPK_KEY_BLOCK = 32
# Inputs per call of the score kernel (score_kernel): the part's inputs of that many, D vectors each, stay in
# cache beside one codebook's keys (1024 x 15 floats and 4096 x 15 at the paper's sizes).
KERNEL_SAMPLES = 1024


def _tile_shape(num_heads: int, num_keys: int, num_samples: int, device: torch.device) -> tuple[int, int]:
    """(heads, samples) of one score tile: at least 256 samples for the CPU's matrix kernel unless the heads
    alone fill the budget."""
    budget = TILE_FLOATS["cpu" if device.type == "cpu" else "cuda"]
    heads = max(1, min(num_heads, budget // (num_keys * 256)))
    samples = max(1, min(num_samples, budget // (heads * num_keys)))
    return heads, samples


@functools.cache
def _augment_compiled():
    """augmented_keys for float32 CPU keys as one compiled pass over a range of rows (torch took three passes
    and a fresh 63 MB output: 41 ms at the paper's sizes, against 10 ms on one thread). Made at the first call of
    a process (numba)."""
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def augment(keys, out, lo, hi):
        # keys (R, d) float32 -> out (R, d + 1) rows lo:hi: [-2 key, the squares summed in order]
        d = keys.shape[1]
        for r in range(lo, hi):
            total = np.float32(0.0)
            for j in range(d):
                v = keys[r, j]
                out[r, j] = np.float32(-2.0) * v
                total += v * v
            out[r, d] = total

    return augment


def augmented_keys(keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(C, K, d_k) -> (C, K, d_k + 1): [-2 key, ||key||^2], so that a dot product with [z, 1] is the score (on
    the CPU in float32 the squares are summed in order, key dimension 0 first). `out`, where given, is written."""
    c, k, d = keys.shape
    if out is None:
        out = torch.empty(c, k, d + 1, dtype=keys.dtype, device=keys.device)
    if keys.device.type == "cpu" and keys.dtype == out.dtype == torch.float32 and out.is_contiguous():
        # key learning makes new keys every batch, so this runs every batch: rows split over torch's threads
        src, dst = keys.detach().reshape(-1, d).contiguous().numpy(), out.view(-1, d + 1).numpy()
        compiled.run_ranges(lambda lo, hi: _augment_compiled()(src, dst, lo, hi), len(src), compiled.threads())
        return out
    torch.mul(keys, -2.0, out=out[..., :d])
    out[..., d] = torch.einsum("ckd,ckd->ck", keys, keys)  # one pass, no (C, K, d_k) temporary
    return out


# The augmented copy of the last frozen keys searched: evaluation and the index cache search the same keys batch
# after batch, and at K=4096, C=256 the copy is 63 MB. Held by a weak reference and checked against the keys'
# version counter, so changed or freed keys are never served; keys changed in place (key learning, every batch)
# are augmented again into the same buffer.
_augmented_cache: tuple = (None, -1, None)


def _augmented(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """augmented_keys(keys) in `dtype`, reused while `keys` lives unchanged (views are not cached)."""
    global _augmented_cache
    ref, version, ka = _augmented_cache
    same = ref is not None and ref() is keys and ka.dtype == dtype
    if same and keys._version == version:
        return ka
    ka = augmented_keys(keys.to(dtype), out=ka if same else None)
    if keys._base is None:
        _augmented_cache = (weakref.ref(keys), keys._version, ka)
    return ka


def _key_block(num_keys: int, largest: int = KEY_BLOCK) -> int:
    """Keys per block of the two-step reductions (0: K has no fitting divisor; reduce whole rows)."""
    return next((s for s in (64, 32, 16, 8) if s <= largest and num_keys % s == 0 and num_keys > s), 0)


@functools.cache
def _first_min_compiled():
    """A compiled top-1 reduction for float32 CPU tiles: one pass over the tile in memory order, a strict < so
    the first minimum stays (2-3x faster than the two-step reduction below at the paper's tile sizes). On one
    thread: split over two, it ran 4x slower, sharing the second core with torch's OpenMP threads, which keep
    spinning for a while after the score product. Made at the first search of a process (numba)."""
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def first_min(tile, out):
        # tile (h, K, b) float32 -> out (h, b) int64: per column the first index of its minimum (a NaN score,
        # which finite inputs and keys never give, is never picked after key 0, where torch's argmin picks it)
        h, num_keys, b = tile.shape
        best = np.empty(b, tile.dtype)
        for i in range(h):
            t, o = tile[i], out[i]
            best[:] = t[0]
            o[:] = 0
            for key in range(1, num_keys):
                row = t[key]
                for s in range(b):
                    if row[s] < best[s]:
                        best[s] = row[s]
                        o[s] = key

    return first_min


def _first_min(tile: torch.Tensor) -> torch.Tensor:
    """(h, K, b) scores -> (h, b) index of the first (lowest-index) minimum over K."""
    h, num_keys, b = tile.shape
    if tile.device.type == "cpu" and tile.dtype == torch.float32 and tile.is_contiguous():
        out = torch.empty(h, b, dtype=torch.long)
        _first_min_compiled()(tile.numpy(), out.numpy())
        return out
    kb = _key_block(num_keys)
    if not kb:
        return tile.argmin(1)  # argmin returns the first minimal index (documented, CPU and CUDA)
    blocks = tile.view(h, num_keys // kb, kb, b)
    # The first block holding the minimum holds the first minimal key; inside it, the first minimal position.
    block = blocks.amin(2).argmin(1)  # (h, b)
    hi = torch.arange(h, device=tile.device).view(h, 1)
    bi = torch.arange(b, device=tile.device).view(1, b)
    pos = blocks[hi, block, :, bi].argmin(-1)  # (h, b, kb) -> (h, b)
    return block * kb + pos


def _first_k_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) scores -> (..., k) positions of the k smallest, in (score, position) order."""
    take = min(k + 1, rows.shape[-1])
    vals, idx = rows.topk(take, dim=-1, largest=False, sorted=True)
    # topk breaks ties arbitrarily. Within the chosen k: order by position, then stable by score.
    sel, order = idx[..., :k].sort(-1)
    out = sel.gather(-1, vals[..., :k].gather(-1, order).sort(dim=-1, stable=True).indices)
    if take > k:
        # Where the (k+1)-th score equals the k-th, which tied keys make the cut is topk's choice: those
        # (rare) rows are sorted in full, stably, so the lowest positions win.
        tied = vals[..., k] == vals[..., k - 1]
        if bool(tied.any()):
            out[tied] = rows[tied].sort(dim=-1, stable=True).indices[:, :k]
    return out


@functools.cache
def _first_k_compiled():
    """A compiled top-k reduction for float32 CPU tiles: one pass over the tile in memory order, each column
    keeping its k best so far sorted; a key enters only below the column's k-th score (strict <, so that of equal
    scores the lower index, met first, stays ahead). At the paper's sizes (k=16, K=4096) a search of 2048 inputs
    took 1.9 s with it, 3.8 s with the torch reduction below. Made at the first search of a process (numba)."""
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def first_k(tile, out, best):
        # tile (h, K, b) float32 -> out (h, b, k) int64, in (score, index) order; best (b, k) float32 scratch:
        # each column's k best scores so far.
        # Keys scoring +inf (masked) never enter: where fewer than k keys score below it, the remaining places
        # go to the +inf keys, lowest index first, as the module doc's tie rule has it (and to NaN scores, which
        # finite inputs and keys never give, as +inf).
        h, num_keys, b = tile.shape
        k = out.shape[2]
        for i in range(h):
            t, o = tile[i], out[i]
            best[:] = np.inf
            o[:] = -1
            for key in range(num_keys):
                row = t[key]
                for s in range(b):
                    v = row[s]
                    if v < best[s, k - 1]:
                        p = k - 1  # shift the larger ones down; equal scores stay ahead of the newcomer
                        while p > 0 and best[s, p - 1] > v:
                            best[s, p] = best[s, p - 1]
                            o[s, p] = o[s, p - 1]
                            p -= 1
                        best[s, p] = v
                        o[s, p] = key
            for s in range(b):
                if o[s, k - 1] < 0:  # fewer than k finite scores: +inf keys next, by index
                    p = 0
                    while o[s, p] >= 0:
                        p += 1
                    for key in range(num_keys):
                        if p == k:
                            break
                        if not t[key, s] < np.inf:  # every key scoring below +inf is in already
                            o[s, p] = key
                            p += 1

    return first_k


@functools.cache
def _fill_by_index():
    """The score kernel's top-k leaves -1 where fewer than k keys scored below +inf: those places go to the
    other keys (masked, +inf; or NaN), lowest index first, as the module doc's tie rule has it. Made at the first
    call of a process (numba)."""
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def fill(out):
        # out (n, k) int64, each row's ranked keys first, then -1s
        n, k = out.shape
        for s in range(n):
            if out[s, k - 1] >= 0:
                continue
            p = 0
            while out[s, p] >= 0:
                p += 1
            key = 0
            while p < k:
                taken = False
                for q in range(p):
                    taken |= out[s, q] == key
                if not taken:
                    out[s, p] = key
                    p += 1
                key += 1

    return fill


def _first_k(tile: torch.Tensor, k: int) -> torch.Tensor:
    """(h, K, b) scores -> (h, b, k) indices of the k smallest, in (score, index) order."""
    h, num_keys, b = tile.shape
    if tile.device.type == "cpu" and tile.dtype == torch.float32 and tile.is_contiguous():
        out = torch.empty(h, b, k, dtype=torch.long)
        _first_k_compiled()(tile.numpy(), out.numpy(), np.empty((b, k), np.float32))
        return out
    rows = tile.transpose(1, 2)  # (h, b, K)
    kb = _key_block(num_keys, TOPK_KEY_BLOCK)
    if not kb or 2 * k * kb > num_keys:
        return _first_k_rows(rows, k)
    # The k blocks with the smallest minima hold k scores <= the k-th of those minima, and every other block
    # scores above it unless its minimum ties: so, barring such a tie, the k nearest keys lie in those k
    # blocks, and only they are ranked (an eighth of the row at K=4096, k=16).
    blocks = tile.view(h, num_keys // kb, kb, b)
    minima = blocks.amin(2).transpose(1, 2)  # (h, b, blocks)
    bv, chosen = minima.topk(k + 1, dim=-1, largest=False, sorted=True)
    chosen = chosen[..., :k].sort(-1).values  # ascending: gathered keys come in index order
    hi = torch.arange(h, device=tile.device).view(h, 1, 1)
    bi = torch.arange(b, device=tile.device).view(1, b, 1)
    vals = blocks[hi, chosen, :, bi].reshape(h, b, k * kb)  # (h, b, k, kb) -> (h, b, k * kb)
    keys = (chosen.unsqueeze(-1) * kb + torch.arange(kb, device=tile.device)).reshape(h, b, k * kb)
    out = keys.gather(-1, _first_k_rows(vals, k))
    tied = bv[..., k] == bv[..., k - 1]  # a block left out may hold a score equal to the cut: rank the row whole
    if bool(tied.any()):
        out[tied] = rows[tied].sort(dim=-1, stable=True).indices[:, :k]
    return out


@torch.no_grad()
def nearest_keys(z: torch.Tensor, keys: torch.Tensor, k: int = 1,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, d_k), keys (C, K, d_k) -> (B, C, k) int64 indices of each head's k nearest allowed keys, exact,
    in (score, index) order; ties go to the lowest index. `allowed` (C, K) bool masks keys (see module doc)."""
    n, c, d = z.shape
    num_keys = keys.shape[1]
    if not 1 <= k <= num_keys:
        raise ValueError(f"nearest_keys: k must lie in [1, {num_keys}] (the keys per codebook), got {k}")
    out = torch.empty(n, c, k, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    ka = _augmented(keys, z.dtype)
    blocked = None if allowed is None or bool(allowed.all()) else (~allowed).contiguous()
    kernel = score_kernel.kernels(d + 1) if z.device.type == "cpu" and z.dtype == torch.float32 else None
    heads, samples = _tile_shape(c, num_keys, n, z.device)
    starts = range(0, c, 1 if kernel is not None else heads)  # the first head of each tile of a sample block
    parts = min(compiled.threads(), len(starts)) if z.device.type == "cpu" else 1
    bounds = [starts[len(starts) * p // parts] for p in range(parts)] + [c]  # part p: heads bounds[p]:bounds[p+1]

    def search_kernel(lo: int, hi: int) -> None:
        """Heads lo:hi through the score kernel, block by block of inputs, each head in one call a block."""
        w = kernel.lanes
        width = -(-min(KERNEL_SAMPLES, n) // w) * w  # a block's inputs, padded to whole lanes
        z_buf = torch.empty((hi - lo) * (d + 1) * width)
        found = torch.empty((hi - lo) * width * k, dtype=torch.long)
        best = torch.empty(w, k)  # top-k: the lanes' k best scores so far
        for s0 in range(0, n, KERNEL_SAMPLES):
            b = min(KERNEL_SAMPLES, n - s0)
            bw = -(-b // w) * w
            # [z, 1] of the block's inputs, coordinate-major per head; padded lanes zero (their answers dropped)
            za = z_buf[: (hi - lo) * (d + 1) * bw].view(hi - lo, d + 1, bw)
            za[:, :d, :b].copy_(z[s0:s0 + b, lo:hi].permute(1, 2, 0))
            za[:, d, :b].fill_(1.0)
            za[:, :, b:].zero_()
            nearest = found[: (hi - lo) * bw * k].view(hi - lo, bw, k)
            for h in range(lo, hi):
                mask = None if blocked is None else blocked[h]
                if k == 1:
                    kernel.top1(ka[h], za[h - lo], mask, nearest[h - lo, :, 0])
                else:
                    kernel.topk(ka[h], za[h - lo], mask, nearest[h - lo], best)
            if k > 1:  # places no key scored below +inf for (masked keys): filled by index
                _fill_by_index()(nearest.view(-1, k).numpy())
            out[s0:s0 + b, lo:hi] = nearest[:, :b].transpose(0, 1)

    def search(part: int) -> None:
        """Every sample block of this part's heads, tile by tile, on buffers of its own."""
        lo, hi = bounds[part], bounds[part + 1]
        if kernel is not None:
            search_kernel(lo, hi)
            return
        tile_buf = torch.empty(heads * num_keys * samples, dtype=z.dtype, device=z.device)
        z_buf = torch.empty((hi - lo) * (d + 1) * samples, dtype=z.dtype, device=z.device)
        for s0 in range(0, n, samples):
            b = min(samples, n - s0)
            # [z, 1] of the block's samples for the part's heads, head-major; the front of the buffer, so that
            # every block, a partial last one too, is laid out (and multiplied) alike.
            za = z_buf[: (hi - lo) * (d + 1) * b].view(hi - lo, d + 1, b)
            za[:, :d].copy_(z[s0:s0 + b, lo:hi].permute(1, 2, 0))
            za[:, d].fill_(1.0)
            for h0 in range(lo, hi, heads):
                h = min(heads, hi - h0)
                tile = tile_buf[: h * num_keys * b].view(h, num_keys, b)
                torch.bmm(ka[h0:h0 + h], za[h0 - lo:h0 - lo + h], out=tile)
                if blocked is not None:
                    tile.masked_fill_(blocked[h0:h0 + h].unsqueeze(-1), float("inf"))
                if k == 1:
                    out[s0:s0 + b, h0:h0 + h, 0] = _first_min(tile).t()
                else:
                    out[s0:s0 + b, h0:h0 + h] = _first_k(tile, k).transpose(0, 1)

    if parts == 1:
        search(0)
        return out
    # One part per torch thread, each part's products on one thread: the cores then stay busy through the
    # reductions (compiled, on one thread), where one search with all threads in its products leaves all but one
    # core idle in every reduction. Top-1 of 2048 inputs at the paper's sizes on 2 cores: 0.64 s, against 1.03 s.
    threads = torch.get_num_threads()

    def one_thread_part(part: int) -> None:
        torch.set_num_threads(1)  # torch's count (process-wide: restored below) and this thread's OpenMP and MKL
        search(part)

    try:
        compiled.run_parts(one_thread_part, parts)
    finally:
        torch.set_num_threads(threads)
    return out


def candidate_dtype(num_keys: int) -> torch.dtype:
    """The smallest integer type that holds a key index (candidates are kept for whole evaluation sets)."""
    return torch.int16 if num_keys <= 2**15 else torch.int32


@torch.no_grad()
def answer_from_candidates(cand: torch.Tensor, z: torch.Tensor, keys: torch.Tensor, k: int = 1,
                           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """What `nearest_keys(z, keys, k, allowed)` returns, read off each (input, codebook)'s m nearest keys
    `cand` (B, C, m) (nearest_keys(z, keys, m) without a mask): the first k allowed candidates, in order.

    Exact: any allowed key nearer than the first allowed candidate would itself be a candidate. Pairs with
    fewer than k allowed candidates are searched in full, under the mask, codebook by codebook.
    """
    n, c, m = cand.shape
    if k > m:
        raise ValueError(f"answer_from_candidates: k ({k}) exceeds the {m} candidates kept")
    cand = cand.long()
    if allowed is None:
        return cand[..., :k].clone()
    heads = torch.arange(c, device=cand.device).view(1, c, 1)
    ok = allowed[heads, cand]  # (B, C, m)
    if k == 1:
        first = ok.to(torch.int8).argmax(-1, keepdim=True)  # first allowed (argmax: first maximal index)
        out = cand.gather(-1, first)
        short = ~ok.any(-1)
    else:
        order = (~ok).to(torch.int8).sort(dim=-1, stable=True).indices[..., :k]  # allowed first, in distance order
        out = cand.gather(-1, order)
        short = ok.sum(-1) < k
    if bool(short.any()):
        rows, cols = short.nonzero(as_tuple=True)
        for head in torch.unique(cols).tolist():
            r = rows[cols == head]
            out[r, head] = nearest_keys(z[r, head:head + 1], keys[head:head + 1], k,
                                        allowed[head:head + 1])[:, 0]
    return out
