"""The compiled loops of workloads.sparse_step, the DKVB value step on the CPU (its docstring says what each
phase computes and why the loops walk the rows as they do). Imported at a process's first step: importing numba
costs about half a second. Each phase runs blocks i0..i1-1 of the codebooks, block i being codebooks
edges[i]..edges[i+1]-1; the *_parts functions run contiguous runs of blocks at once.

Rows are `width` floats wide (the value row, and where the table pads it, the padding up to a whole number of
LANES; see sparse_step.row_width) and handled LANES floats at a time by the vector intrinsics below: numba's own
loops over a row stay scalar (its arrays carry no no-alias facts, so LLVM will not reorder their loads and
stores), and one row's ten scalar adds left the loops compute-bound even with every row in cache. The padding
lanes of dlogits and of the gradient rows are zero: a padding float of the table is read and written back as it
was (x - step * 0).
"""
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from workloads.sparse_step import LANES

jit = numba.njit(nogil=True, cache=True, boundscheck=False)
# the per-row helpers, inlined into their loops (as calls, each row paid a call and a chunk loop's set-up)
row_op = numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")


def _element(context, builder, sig, args, a):
    """Pointer to array args[a] at row args[a + 1], column args[a + 2]."""
    aryty = sig.args[a]
    ary = context.make_array(aryty)(context, builder, args[a])
    at = [context.cast(builder, args[a + n], sig.args[a + n], types.intp) for n in (1, 2)]
    return cgutils.get_item_pointer(context, builder, aryty, ary, at, wraparound=False)


def _vector(builder, ptr, element: ir.Type):
    return builder.bitcast(ptr, ir.VectorType(element, LANES).as_pointer())


@intrinsic
def add_wide(typingctx, out, i, j, src, r, c):
    """out[i, j:j + LANES] (float64) += src[r, c:c + LANES] (float32, widened): each lane's sum as numba's."""
    def codegen(context, builder, sig, args):
        wide = ir.VectorType(ir.DoubleType(), LANES)
        dst = _vector(builder, _element(context, builder, sig, args, 0), ir.DoubleType())
        x = builder.load(_vector(builder, _element(context, builder, sig, args, 3), ir.FloatType()), align=4)
        builder.store(builder.fadd(builder.load(dst, align=8), builder.fpext(x, wide)), dst, align=8)
        return context.get_dummy_value()
    return types.void(out, i, j, src, r, c), codegen


@intrinsic
def add_lanes(typingctx, out, i, j, src, r, c):
    """out[i, j:j + LANES] += src[r, c:c + LANES] (float32)."""
    def codegen(context, builder, sig, args):
        dst = _vector(builder, _element(context, builder, sig, args, 0), ir.FloatType())
        x = builder.load(_vector(builder, _element(context, builder, sig, args, 3), ir.FloatType()), align=4)
        builder.store(builder.fadd(builder.load(dst, align=4), x), dst, align=4)
        return context.get_dummy_value()
    return types.void(out, i, j, src, r, c), codegen


@intrinsic
def descend(typingctx, table, i, j, grad, r, c, step):
    """table[i, j:j + LANES] -= step * grad[r, c:c + LANES] (a product, then a difference: two roundings, as
    numba's scalar code has them); then grad[r, c:c + LANES] = 0."""
    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        row = _vector(builder, _element(context, builder, sig, args, 0), ir.FloatType())
        g = _vector(builder, _element(context, builder, sig, args, 3), ir.FloatType())
        lane0 = builder.insert_element(ir.Constant(vec, ir.Undefined), args[6], ir.Constant(ir.IntType(32), 0))
        steps = builder.shuffle_vector(lane0, ir.Constant(vec, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
        moved = builder.fsub(builder.load(row, align=4), builder.fmul(steps, builder.load(g, align=4)))
        builder.store(moved, row, align=4)
        builder.store(ir.Constant(vec, [0.0] * LANES), g, align=4)
        return context.get_dummy_value()
    return types.void(table, i, j, grad, r, c, step), codegen


def _prefetch(write: int):
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        ptr = _element(context, builder, sig, args, 0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(write), i32(3), i32(1)])  # (rw, locality: keep in all levels, data)
        return context.get_dummy_value()
    return codegen


@intrinsic
def prefetch_read(typingctx, table, i, j):
    """Ask for the cache line of table[i, j] to be read soon."""
    return types.void(table, i, j), _prefetch(0)


@intrinsic
def prefetch_write(typingctx, table, i, j):
    """Ask for the cache line of table[i, j] to be written soon."""
    return types.void(table, i, j), _prefetch(1)


@jit
def prefetch_rows(table, base, sel, write):
    # the lines of rows base + sel[e]: the next codebook's, while this one's rows are summed (a row's cache miss
    # takes longer than the few vector operations on it, so without this the loops wait on memory)
    for e in range(len(sel)):
        if write:
            prefetch_write(table, base + sel[e], 0)
        else:
            prefetch_read(table, base + sel[e], 0)


@row_op
def add_row(out, i, src, r, width):
    # out[i, :width] (float64) += src[r, :width] (float32)
    # d_v 9..16 on padded rows (CIFAR-10's 10 classes): two operations, no loop (the helpers below do the same;
    # with the loop's set-up every row, the update phase took 1.3x as long on one thread, rows in cache)
    if width == 2 * LANES:
        add_wide(out, i, 0, src, r, 0)
        add_wide(out, i, LANES, src, r, LANES)
        return
    full = width // LANES * LANES
    for c in range(0, full, LANES):
        add_wide(out, i, c, src, r, c)
    for v in range(full, width):
        out[i, v] += np.float64(src[r, v])


@row_op
def add_grad(acc, key, g, s, width):
    # acc[key, :width] += g[s, :width] (float32)
    if width == 2 * LANES:
        add_lanes(acc, key, 0, g, s, 0)
        add_lanes(acc, key, LANES, g, s, LANES)
        return
    full = width // LANES * LANES
    for c in range(0, full, LANES):
        add_lanes(acc, key, c, g, s, c)
    for v in range(full, width):
        acc[key, v] += g[s, v]


@row_op
def descend_row(table, row, acc, key, step, width):
    # table[row, :width] -= step * acc[key, :width]; acc[key, :width] = 0
    if width == 2 * LANES:
        descend(table, row, 0, acc, key, 0, step)
        descend(table, row, LANES, acc, key, LANES, step)
        return
    full = width // LANES * LANES
    for c in range(0, full, LANES):
        descend(table, row, c, acc, key, c, step)
    for v in range(full, width):
        table[row, v] -= step * acc[key, v]
        acc[key, v] = 0.0


@row_op
def scatter_grads(acc, sel, g, k, width):
    # acc[sel[s * k + j]] += g[s] for every sample s and selection j, in that order
    for s in range(len(g)):
        for j in range(s * k, s * k + k):
            add_grad(acc, sel[j], g, s, width)


@jit
def block_logits(table, idx, num_keys, edges, i0, i1, keys, partials, width):
    # keys[h] (b * k,) := codebook h's selections, sample-major (read once here, in idx's own order, and
    # contiguous for the phases after); partials[i] (b, width) float64 := the sum of the value rows block i's
    # codebooks select, in codebook order. Returns False, having read no value, where a key index lies
    # outside [0, K) (the caller raises: a parallel part cannot).
    b, _, k = idx.shape
    # in tiles of 16 samples: each codebook's run of 16 selections is one line written, and the 16 lines of idx
    # read stay in cache from one codebook to the next (sample by sample, every write went to another line)
    for s0 in range(0, b, 16):
        for h in range(edges[i0], edges[i1]):
            for s in range(s0, min(s0 + 16, b)):
                for j in range(k):
                    key = idx[s, h, j]
                    if key < 0 or key >= num_keys:  # before any value is read or written
                        return False
                    keys[h, s * k + j] = key
    for i in range(i0, i1):
        out = partials[i]
        out[:] = 0.0
        for h in range(edges[i], edges[i + 1]):
            if h + 1 < edges[i1]:
                prefetch_rows(table, (h + 1) * num_keys, keys[h + 1], False)
            base, sel = h * num_keys, keys[h]
            for s in range(b):
                for j in range(s * k, s * k + k):
                    add_row(out, s, table, base + sel[j], width)
    return True


@jit
def vote_loss(partials, y, entries, smoothing, dlogits, d):
    # logits = the blocks' partials added in block order / entries (C * k); dlogits (b, width) float32 := the
    # gradient reaching each selected value, (softmax - target) / (b * C * k), in its first d lanes (the others
    # stay zero); returns the mean loss and the sum of the squared dlogits
    nb, b, _ = partials.shape
    off = smoothing / d
    loss, squares = 0.0, 0.0
    logits = np.empty(d)
    for s in range(b):
        if y[s] < 0 or y[s] >= d:
            raise IndexError("sparse_sgd_step: a label lies outside [0, d_v)")
        for v in range(d):
            total = 0.0
            for i in range(nb):
                total += partials[i, s, v]
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
            dlogits[s, v] = g
            squares += np.float64(g) * g
    return loss / b, squares


@jit
def block_norm(keys, k, dlogits, d, edges, i0, i1, acc, norms, width):
    # norms[i] := the squared norm of block i's value gradient, each selected key's gradient being the sum
    # of its samples' dlogits in sample order, squared and summed class by class (then key by key, each key at
    # its first selection: the zero left adds 0); acc (K, width) float32 is all zero on entry and on return
    for i in range(i0, i1):
        sq = 0.0
        for h in range(edges[i], edges[i + 1]):
            sel = keys[h]
            scatter_grads(acc, sel, dlogits, k, width)
            for v in range(d):
                part = 0.0
                for e in range(len(sel)):
                    x = np.float64(acc[sel[e], v])
                    part += x * x
                    acc[sel[e], v] = 0.0
                sq += part
        norms[i] = sq


@jit
def block_update(table, keys, k, num_keys, dlogits, edges, i0, i1, acc, step, usage, width):
    # every selected row minus step x its gradient (summed as block_norm sums it); a row selected twice is
    # written at its first selection, then minus step x 0 (unchanged); acc as in block_norm. Codebooks in
    # reverse: the last ones block_logits read are the likeliest still in this core's cache. usage (C * K,)
    # int64 += 1 per selection, unless it is empty.
    count = len(usage) > 0
    for h in range(edges[i1] - 1, edges[i0] - 1, -1):
        if h - 1 >= edges[i0]:
            prefetch_rows(table, (h - 1) * num_keys, keys[h - 1], True)
        base, sel = h * num_keys, keys[h]
        scatter_grads(acc, sel, dlogits, k, width)
        for e in range(len(sel)):
            descend_row(table, base + sel[e], acc, sel[e], step, width)
        if count:
            counts = usage[base:base + num_keys]
            for e in range(len(sel)):
                counts[sel[e]] += 1


# The same phases over contiguous runs of blocks at once, runs[t]..runs[t + 1] - 1 for each part t, on numba's
# threads: waking them costs less than a Python pool's hand-off, twice a step (bench/bottleneck_step.py, paper
# sizes, 2 cores, numba's OpenMP layer: a step 1.22x and 1.48x faster, an epoch 1.03x and 1.14x, in two runs).
# They are module functions, not closures, so that numba's cache keeps them (a parallel closure compiles anew
# in every process, ~4 s).
par = numba.njit(nogil=True, cache=True, boundscheck=False, parallel=True)


@par
def logits_parts(table, idx, num_keys, edges, runs, keys, partials, ok, width):
    for t in numba.prange(len(runs) - 1):
        ok[t] = block_logits(table, idx, num_keys, edges, runs[t], runs[t + 1], keys, partials, width)


@par
def norm_parts(keys, k, dlogits, d, edges, runs, acc, norms, width):
    for t in numba.prange(len(runs) - 1):
        block_norm(keys, k, dlogits, d, edges, runs[t], runs[t + 1], acc[t], norms, width)


@par
def update_parts(table, keys, k, num_keys, dlogits, edges, runs, acc, step, usage, width):
    for t in numba.prange(len(runs) - 1):
        block_update(table, keys, k, num_keys, dlogits, edges, runs[t], runs[t + 1], acc[t], step, usage, width)
