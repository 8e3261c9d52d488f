"""The Discrete Key-Value Bottleneck (Träuble et al., ICML 2023).

An embedding x (D) is projected into C heads (d_k each) by fixed random matrices; each head looks up its
nearest key(s) in its own codebook of K keys and fetches the paired value(s) (d_v). Keys are learned once on
unlabelled data and then frozen; only the values train on the non-stationary stream, so an update touches
only the values that the current inputs select.

Shapes: B samples, D input dim, C codebooks (= heads), K keys per codebook, d_k key dim, d_v value dim.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Literal

import torch
from torch import nn

from workloads import compiled, keysearch, sparse_step
from workloads.progress import ProgressLog

log = logging.getLogger(__name__)

# Deferred key selections (count_usage) are added to the counters once this many are pending (64 MiB of int32).
PENDING_SELECTIONS = 2**24
# Bytes of a CPU cache line: a value row shorter than this is padded so that no row straddles two (value_table).
CACHE_LINE = 64

def random_projection(input_dim: int, num_codebooks: int, key_dim: int, gen: torch.Generator,
                      density: float | None = None) -> torch.Tensor:
    """(D, C * d_k) Gaussian (or sparse +-1) projection, every column unit-norm over the input dimension."""
    if density is None:
        proj = torch.randn(input_dim, num_codebooks * key_dim, generator=gen)
    else:
        # Very sparse random projection (Li et al. 2006): +-1 with probability density / 2 each, else 0.
        u = torch.rand(input_dim, num_codebooks * key_dim, generator=gen)
        proj = torch.where(u < density / 2, 1.0, torch.where(u < density, -1.0, 0.0))
        empty = (proj != 0).sum(0) == 0  # a column of zeros would make a head constant
        rows = torch.randint(input_dim, (int(empty.sum()),), generator=gen)
        proj[rows, empty.nonzero().squeeze(1)] = 1.0
    return proj / proj.norm(dim=0, keepdim=True)


def nearest_keys(z: torch.Tensor, keys: torch.Tensor, k: int = 1,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, d_k), keys (C, K, d_k) -> (B, C, k) indices of each head's k nearest allowed keys.

    The search itself lives in workloads.keysearch (exact; ties go to the lowest key index).
    """
    return keysearch.nearest_keys(z, keys, k, allowed)


def table_rows(idx: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Key indices (B, C[, k]) -> flat rows of a (C * K, ...) view of per-codebook tables, sample-major."""
    heads = torch.arange(idx.shape[1], device=idx.device).view(1, -1, *([1] * (idx.dim() - 2)))
    return (idx + heads * num_keys).reshape(-1)


def value_table(values: torch.Tensor) -> torch.Tensor:
    """`values` (C, K, d_v) copied into a table whose rows start on CPU cache lines, as a (C, K, d_v) view.

    A float32 row of d_v < 16 floats is padded to the next power of two (10 -> 16: 40 bytes take a 64-byte line),
    so that every row lies in one cache line. The value step reads and writes one random row per (sample,
    codebook), and at the paper's sizes its time is those rows' cache misses: unpadded, half the 40-byte rows
    straddle two lines (bench/bottleneck_step.py times the step on both layouts). The padding is zero and stays
    zero (the compiled step reads a row with its padding, 8 floats at a time, and writes back 0 - lr x 0 there);
    state dicts hold the rows alone. On other devices, and where rows already tile a line, the table is
    `values` itself, made contiguous.
    """
    d = values.shape[-1]
    row = 1 << (d - 1).bit_length()  # the next power of two
    item = values.element_size()
    if values.device.type != "cpu" or d * item >= CACHE_LINE or row == d:
        return values.contiguous()
    table = torch.zeros(*values.shape[:-1], row, dtype=values.dtype)
    table[..., :d] = values
    return table[..., :d]


class KeyValueBottleneck(nn.Module):
    """C codebooks of K (key, value) pairs behind fixed random projections; values are the trained tensor."""

    def __init__(self, input_dim: int, num_codebooks: int, num_keys: int, key_dim: int, value_dim: int,
                 topk: int = 1, projection: Literal["fixed", "learnable", "sparse"] = "fixed",
                 projection_density: float | None = None, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_codebooks, self.key_dim, self.value_dim, self.topk = num_codebooks, key_dim, value_dim, topk
        self.projection = projection
        if projection == "sparse":
            density = projection_density or 1.0 / math.sqrt(input_dim)
            proj = random_projection(input_dim, num_codebooks, key_dim, gen, density)
            self.register_buffer("proj_t", proj.t().to_sparse().coalesce())  # (C*d_k, D), COO
        else:
            proj = random_projection(input_dim, num_codebooks, key_dim, gen)
            if projection == "learnable":
                self.proj = nn.Parameter(proj)  # (D, C*d_k)
            else:
                self.register_buffer("proj", proj)
        self.register_buffer("keys", torch.randn(num_codebooks, num_keys, key_dim, generator=gen))  # (C, K, d_k)
        self.register_buffer("usage", torch.zeros(num_codebooks, num_keys, dtype=torch.long))  # selections
        self.register_buffer("alive", torch.ones(num_codebooks, num_keys, dtype=torch.bool))  # False once pruned
        self.values = nn.Parameter(value_table(torch.zeros(num_codebooks, num_keys, value_dim)))  # (C, K, d_v)
        self.mask_unused = False  # set by the owner: at evaluation, never-selected keys cannot be fetched
        # Selections counted but not yet added to `usage`: adding many batches in one bincount is ~5x cheaper
        # than one scatter per step; reading `usage` (or the state) adds them first, so counts stay exact.
        self._pending: list[tuple[torch.Tensor, int]] = []  # (selections, times each), see count_usage
        self._pending_entries = 0

    def __getattr__(self, name: str):
        if name == "usage" and self.__dict__.get("_pending"):
            self.flush_usage()
        return super().__getattr__(name)

    @property
    def num_keys(self) -> int:
        return self.keys.shape[1]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C, d_k)."""
        if self.projection == "sparse":
            z = torch.sparse.mm(self.proj_t, x.t()).t()
        else:
            z = x @ self.proj
        return z.reshape(len(x), self.num_codebooks, self.key_dim)

    def allowed_keys(self) -> torch.Tensor:
        """(C, K) bool: the keys a lookup may select now (alive; at evaluation with mask_unused, also used)."""
        allowed = self.alive
        if self.mask_unused and not self.training:
            used = self.usage > 0
            allowed = allowed & torch.where(used.any(1, keepdim=True), used, True)  # codebooks with no use: all keys
        return allowed

    def lookup(self, z: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """(B, C, d_k) -> (B, C, k) indices of the nearest keys, batched over heads and samples."""
        return nearest_keys(z, self.keys, k or self.topk, self.allowed_keys())

    def lookup_candidates(self, cand: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """What lookup(z) returns, read off each input's nearest keys `cand` (B, C, m), made with no mask by
        keysearch.nearest_keys(z, keys, m) for these keys; exact whatever keys the mask allows now."""
        return keysearch.answer_from_candidates(cand, z, self.keys, self.topk, self.allowed_keys())

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, C, k) indices -> (B, C, d_v): the selected values, averaged over the k nearest keys."""
        heads = torch.arange(self.num_codebooks, device=idx.device).view(1, -1, 1)
        return self.values[heads, idx].mean(2)

    def count_usage(self, idx: torch.Tensor, times: int = 1) -> None:
        """Add `times` selections per (sample, codebook, key) in idx (B, C, k) to the usage counters (deferred:
        see flush_usage). idx is kept, not copied: the caller must not change it afterwards."""
        small = self.num_codebooks * self.num_keys < 2**31
        self._pending.append((idx.to(torch.int32) if small else idx.long(), times))
        self._pending_entries += idx.numel()
        if self._pending_entries >= PENDING_SELECTIONS:
            self.flush_usage()

    def sgd_step(self, idx: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float | None,
                 label_smoothing: float, count: bool = True) -> float:
        """One sparse_sgd_step of the vote decoder's loss on the values; with `count`, its selections idx
        (B, C, k) counted in `usage`: by the compiled CPU step as it goes, else deferred (count_usage)."""
        usage = self._buffers["usage"]
        if sparse_step.supports(self.values, idx) and usage.is_contiguous():
            return sparse_step.sparse_sgd_step(self.values.data, idx, y, lr, grad_clip, label_smoothing,
                                               usage if count else None)
        if count:
            self.count_usage(idx)
        return torch_sparse_sgd_step(self.values.data, idx.long(), y, lr, grad_clip, label_smoothing)

    def flush_usage(self) -> None:
        """Add the selections count_usage deferred to `usage`."""
        pending, self._pending, self._pending_entries = self._pending, [], 0
        if not pending:
            return
        usage = self._buffers["usage"]
        heads = torch.arange(self.num_codebooks, device=usage.device).view(1, -1, 1) * self.num_keys
        for times in sorted({t for _, t in pending}):
            flat = torch.cat([(p.to(usage.device) + heads.to(p.dtype)).reshape(-1) for p, t in pending if t == times])
            usage.view(-1).add_(torch.bincount(flat, minlength=usage.numel()).mul_(times))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush_usage()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars and not destination[prefix + "values"].is_contiguous():  # the rows, not their padding
            destination[prefix + "values"] = destination[prefix + "values"].contiguous()

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending, self._pending_entries = [], 0  # the loaded counters replace everything counted so far
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.flush_usage()  # before the counters move (device, dtype)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C, d_v). A learnable projection gets gradients through a straight-through estimator."""
        z = self.project(x)
        if self.projection != "learnable" or not self.training:
            with torch.no_grad():
                idx = self.lookup(z)
            return self.fetch(idx)
        # Straight-through: forward = hard lookup; backward = soft attention over the nearest candidates.
        with torch.no_grad():
            cand = self.lookup(z, k=min(self.num_keys, max(4, 2 * self.topk)))  # (B, C, m)
        idx = cand[:, :, : self.topk]
        heads = torch.arange(self.num_codebooks, device=x.device).view(1, -1, 1)
        dist = (z.unsqueeze(2) - self.keys[heads, cand]).pow(2).sum(-1)  # (B, C, m)
        weights = torch.softmax(-dist / dist.detach().mean(-1, keepdim=True).clamp_min(1e-8), -1)
        # Detached values: the soft path only steers the projection; the values keep the bottleneck's locality
        # (only the fetched rows train, with exactly the hard lookup's gradient).
        soft = (weights.unsqueeze(-1) * self.values.detach()[heads, cand]).sum(2)  # (B, C, d_v)
        return self.fetch(idx) + soft - soft.detach()

    @torch.no_grad()
    def prune(self) -> int:
        """Drop key-value pairs never selected; codebooks keep a common K (padding marked not alive)."""
        keep = (self.usage > 0) & self.alive
        new_k = max(1, int(keep.sum(1).max()))
        order = torch.sort(keep.int(), dim=1, descending=True, stable=True).indices[:, :new_k]  # kept first
        gather = lambda t: torch.gather(t, 1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand(
            -1, -1, *t.shape[2:]))
        removed = int(self.alive.sum() - keep.sum())
        self.keys = gather(self.keys)
        self.usage = gather(self.usage)
        self.alive = gather(keep)
        self.values = nn.Parameter(value_table(gather(self.values.data)))
        log.info("pruned %d never-selected key-value pairs; %d keys per codebook remain", removed, new_k)
        return removed

    def resize_for_state(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Reshape keys / values / usage / alive to a (possibly pruned) state's sizes before loading it."""
        k = state[prefix + "keys"].shape[1]
        self._pending, self._pending_entries = [], 0
        if k != self.num_keys:
            c = self.num_codebooks
            self.keys = torch.empty(c, k, self.key_dim, device=self.keys.device)
            self.usage = torch.empty(c, k, dtype=torch.long, device=self.usage.device)
            self.alive = torch.empty(c, k, dtype=torch.bool, device=self.alive.device)
            self.values = nn.Parameter(value_table(torch.zeros(c, k, self.value_dim, device=self.values.device)))


# --- key learning ---------------------------------------------------------------------------------------------

def _sample_rows(z: torch.Tensor, num_keys: int, gen: torch.Generator) -> torch.Tensor:
    """(N, C, d_k) -> (C, K, d_k): for each codebook, K inputs drawn at random (independently per codebook)."""
    n, c, _ = z.shape
    if n >= num_keys:
        idx = torch.argsort(torch.rand(c, n, generator=gen), dim=1)[:, :num_keys]  # without replacement
    else:
        idx = torch.randint(n, (c, num_keys), generator=gen)
    return z.transpose(0, 1)[torch.arange(c).unsqueeze(1), idx.to(z.device)]


@functools.cache
def _add_rows_compiled():
    """table[rows[i]] += src[i] for i in order, as compiled loops: torch's index_add_ adds one row per tensor
    operation, and one EMA batch at the paper's sizes adds 262,144 rows of 14 floats (bench/key_search.py times
    the update both ways). Made at the first call of a process (numba)."""
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def add_rows(table, rows, src, codebooks, c0, c1):
        # table (R, d), rows (n,) int64 in [0, R) (checked by the caller), src (n, d), inputs sample-major over
        # `codebooks`: the inputs of codebooks c0:c1 only, each row's in input order (index_add_'s order, so the
        # sums have its bits)
        d = src.shape[1]
        for b in range(len(rows) // codebooks):
            for c in range(c0, c1):
                i = b * codebooks + c
                out, row = table[rows[i]], src[i]
                for j in range(d):
                    out[j] += row[j]

    return add_rows


def _add_rows(table: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, codebooks: int = 1) -> torch.Tensor:
    """table.index_add_(0, rows, src), compiled for float32 CPU tensors (the same sums, bit for bit).

    codebooks > 1: the n inputs are sample-major over that many codebooks (input i belongs to codebook
    i % codebooks), and no row takes inputs of two codebooks (table_rows' rows, or their ranks among the
    selected ones): the codebooks are then split over torch's threads, each part adding its own rows."""
    if (table.device.type == "cpu" and table.dtype == src.dtype == torch.float32 and table.is_contiguous()
            and len(rows) and len(rows) % codebooks == 0 and 0 <= int(rows.min()) and int(rows.max()) < len(table)):
        fn, args = _add_rows_compiled(), (table.numpy(), rows.to(torch.long).numpy(), src.contiguous().numpy())
        compiled.run_ranges(lambda c0, c1: fn(*args, codebooks, c0, c1), codebooks, min(compiled.threads(), codebooks))
        return table
    return table.index_add_(0, rows, src)


def _cluster_sums(z: torch.Tensor, assign: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per codebook: sum of assigned inputs (C, K, d_k) and their count (C, K)."""
    n, c, d = z.shape
    flat = table_rows(assign, num_keys)  # (N*C,)
    sums = _add_rows(torch.zeros(c * num_keys, d, device=z.device), flat, z.reshape(-1, d), c)
    counts = torch.bincount(flat, minlength=c * num_keys).to(z.dtype)
    return sums.view(c, num_keys, d), counts.view(c, num_keys)


def _ema_batch(z: torch.Tensor, assign: torch.Tensor, ema_count: torch.Tensor, ema_sum: torch.Tensor,
               decay: float) -> torch.Tensor:
    """One mini-batch of EMA k-means, in place: ema_count (C, K) and ema_sum (C, K, d_k) decayed, plus (1 - decay)
    x the batch's counts and sums of the inputs z (B, C, d_k) assigned (B, C) to each key; returns the counts.

    Only the keys the batch selects (at most B per codebook) get a sum: they are summed compactly and added to
    their rows alone, where the dense formula (ema_sum * decay + (1 - decay) * sums) adds zeros to every other
    row. The values are the dense formula's, bit for bit: the same torch operation adds the selected rows, and
    adding a zero leaves a float unchanged (up to the sign of a zero sum).
    """
    n, c, d = z.shape
    flat = table_rows(assign, ema_count.shape[1])  # (B*C,)
    rows, inverse = torch.unique(flat, return_inverse=True)  # the selected rows, ascending
    sums = _add_rows(torch.zeros(len(rows), d, device=z.device), inverse, z.reshape(-1, d), c)
    counts = torch.bincount(flat, minlength=ema_count.numel()).to(z.dtype).view_as(ema_count)
    ema_count.mul_(decay).add_(counts, alpha=1 - decay)
    table = ema_sum.view(-1, d)
    table.mul_(decay)
    table.index_copy_(0, rows, table.index_select(0, rows).add_(sums, alpha=1 - decay))
    return counts


@torch.no_grad()
def learn_keys(z: torch.Tensor, num_keys: int, method: Literal["random", "kmeans", "ema"], epochs: int = 10,
               decay: float = 0.95, batch_size: int = 1024, seed: int = 0) -> torch.Tensor:
    """Keys (C, K, d_k) from unlabelled projected inputs z (N, C, d_k).

    random: K inputs drawn per codebook. kmeans: Lloyd's algorithm for `epochs` iterations. ema: VQ-style
    EMA k-means over mini-batches (cluster sizes and sums decayed by `decay`); after each epoch, keys that no
    input selected during it (dead keys) are replaced by random inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    keys = _sample_rows(z, num_keys, gen)
    progress = ProgressLog(log)
    if method == "random":
        return keys
    n, c, _ = z.shape
    if method == "kmeans":
        for epoch in range(epochs):
            sums, counts = _cluster_sums(z, nearest_keys(z, keys)[..., 0], num_keys)
            keys = sums / counts.clamp_min(1).unsqueeze(-1)
            empty = counts == 0
            if empty.any():  # an empty cluster restarts from a random input
                keys = torch.where(empty.unsqueeze(-1), _sample_rows(z, num_keys, gen), keys)
            progress("key k-means epoch %d/%d: %.1f%% empty keys re-seeded", epoch + 1, epochs,
                     100 * float(empty.float().mean()))
        return keys
    ema_count = torch.ones(c, num_keys, device=z.device)
    ema_sum = keys.clone()
    keys_out = torch.empty_like(keys)
    for epoch in range(epochs):
        hits = torch.zeros(c, num_keys, device=z.device)
        order = torch.randperm(n, generator=gen).to(z.device)
        for start in range(0, n, batch_size):
            batch = z[order[start:start + batch_size]]
            counts = _ema_batch(batch, nearest_keys(batch, keys)[..., 0], ema_count, ema_sum, decay)
            hits += counts
            # Laplace smoothing keeps keys with tiny counts finite.
            total = ema_count.sum(1, keepdim=True)
            smoothed = (ema_count + 1e-5) / (total + num_keys * 1e-5) * total
            keys = torch.div(ema_sum, smoothed.unsqueeze(-1), out=keys_out)  # into one buffer: no fresh pages
        dead = hits == 0
        if dead.any():
            fresh = _sample_rows(z, num_keys, gen)
            keys = torch.where(dead.unsqueeze(-1), fresh, keys)
            ema_sum = torch.where(dead.unsqueeze(-1), fresh, ema_sum)
            ema_count = torch.where(dead, 1.0, ema_count)
        progress("key EMA epoch %d/%d: %.1f%% dead keys replaced", epoch + 1, epochs, 100 * float(dead.float().mean()))
    return keys


def bottleneck_bytes(num_codebooks: int, num_keys: int, key_dim: int, value_dim: int) -> int:
    """Memory of keys, values, their gradient and the usage / alive counters, in bytes."""
    return num_codebooks * num_keys * (4 * key_dim + 8 * value_dim + 8 + 1)


def row_words(table: torch.Tensor) -> torch.Tensor:
    """(rows, d) table -> the same memory as (rows, d') 8-byte integers when each row's bytes split into them.

    Gathering and writing back rows is the largest part of the sparse step at paper size (65,536 random rows
    of 10 floats), and torch's index_select / index_copy_ loop per element: as 5 words instead of 10 floats a
    row is half the elements. Integer copies move the bits unchanged (any NaN payload included), so the
    results are identical.
    """
    ratio = 8 // table.element_size()
    if (ratio > 1 and table.is_contiguous() and table.shape[-1] % ratio == 0
            and table.storage_offset() % ratio == 0):
        return table.view(torch.int64)
    return table  # an odd row length (or 8-byte floats already): element by element


def sparse_sgd_step(values: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, lr: float,
                    grad_clip: float | None, label_smoothing: float) -> float:
    """One SGD step of the voting decoder's loss that reads and writes only the value rows idx selects; returns
    the batch's mean loss.

    Exact for SGD without momentum or weight decay: the dense gradient is zero outside those rows, so its norm
    (for clipping) and the update agree with the plain autograd path. values: (C, K, d_v), idx: (B, C, k) int32
    or int64, y: (B,). A float32 table on the CPU takes the compiled step (workloads.sparse_step), anything else
    (a GPU, float64) torch_sparse_sgd_step; the two agree to float32 rounding.
    """
    if sparse_step.supports(values, idx):
        return sparse_step.sparse_sgd_step(values, idx, y, lr, grad_clip, label_smoothing)
    return torch_sparse_sgd_step(values, idx.long(), y, lr, grad_clip, label_smoothing)


def torch_sparse_sgd_step(values: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, lr: float,
                          grad_clip: float | None, label_smoothing: float) -> float:
    """sparse_sgd_step in torch operations, for any device: the selected rows gathered, grouped by row (a sort
    and a CSR product) and written back once each. idx: (B, C, k) int64."""
    b, c, k = idx.shape
    num_keys, d_v = values.shape[1], values.shape[2]
    n = b * c * k
    flat = table_rows(idx, num_keys)  # (n,) sample-major
    table = values.view(-1, d_v)
    words = row_words(table)
    gathered = words.index_select(0, flat)
    selected = gathered.view(values.dtype)  # (n, d_v)
    logp = selected.view(b, c * k, d_v).mean(1).log_softmax(-1)  # vote decoder, (B, d_v)
    target = torch.full_like(logp, label_smoothing / d_v)
    target.scatter_add_(1, y.view(-1, 1), torch.full_like(logp[:, :1], 1.0 - label_smoothing))
    loss = -(target * logp).sum(-1).mean()  # = F.cross_entropy(logits, y, label_smoothing=...)
    dlogits = (logp.exp() - target) / n  # the gradient reaching each of a sample's c * k selected values
    # Group entries by value row: `hits` (rows x samples) counts how often each sample selected each row.
    ordered, perm = torch.sort(flat.int() if values.shape[0] * num_keys < 2**31 else flat)  # int32 sorts faster
    # one pass over the sorted ids for the rows and their entry counts (about half the time of a != mask,
    # nonzero and gather); crow[i] is where row i's entries start in `perm`
    rows, counts = torch.unique_consecutive(ordered, return_counts=True)
    rows = rows.long()
    crow = counts.new_zeros(len(counts) + 1)
    torch.cumsum(counts, 0, out=crow[1:])
    starts = crow[:-1]
    with warnings.catch_warnings():  # torch calls CSR tensors beta; here they are only a grouping device
        warnings.simplefilter("ignore")
        hits = torch.sparse_csr_tensor(crow, perm // (c * k), torch.ones(n, dtype=values.dtype, device=flat.device),
                                       size=(len(rows), b))
    grad = hits @ dlogits  # (R, d_v): the non-zero rows of the dense gradient
    step = torch.tensor(lr, device=grad.device)
    if grad_clip is not None:
        # Same rule as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1.
        step = step * (grad_clip / (grad.norm() + 1e-6)).clamp(max=1.0)
    # the rows' values, from the gathered copy (as words too)
    current = gathered.index_select(0, perm.index_select(0, starts)).view(values.dtype)
    words.index_copy_(0, rows, current.sub_(grad.mul_(step)).view(words.dtype))
    return float(loss)
