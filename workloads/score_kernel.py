"""The nearest-key search's CPU kernel: each score made in vector registers and used at once, never stored.

keysearch ranks the keys of a codebook by score(z, key) = [z, 1] . [-2 key, ||key||^2] (its module doc). Here
that dot product runs for W inputs at once, one lane each: the inputs' D = d_k + 1 coordinates sit in D vector
registers for the whole walk over the codebook's keys, and each key's score is one product and D - 1 fused
multiply-adds (coordinate 0 first, ||key||^2 last), each rounded as an FMA rounds. Top-1 keeps each lane's
first minimum as it goes (a strict <, keys in index order). Top-k keeps each lane's k best so far, sorted, in
memory, and compares each key's scores with the lanes' k-th best at once; only lanes below it insert the key
(a strict <, so equal scores keep the lower index ahead), a few in a hundred keys at K=4096, k=16. Both
compute a score by the same instructions, so they rank keys by the same bits.

Why: with the scores first written by torch.bmm (MKL) into a 4 MiB tile and then read back by a reduction,
one tile of 256 inputs x 4096 keys of d_k=14 took 0.52 ms on one core of this project's 2-core machine, plus
~0.1 ms of Python per tile; this kernel takes 0.23 ms, close to the sgemm rate for the same FLOPs (top-16:
1.1 ms, against 2.0 ms for the scores written out and ranked). A score is computed the same way whatever else
shares its block, so searches of any tiling, mask or k agree bit for bit (and with MKL's bmm, which gave the
same bits in every check: tests/test_keysearch.py runs the search tests on both).

The kernel is LLVM IR generated for one D (the loop over coordinates unrolled, so that the inputs stay in
registers; W = 16 lanes where the CPU has AVX-512, else 8), compiled for this CPU by llvmlite (numba's
compiler) at a process's first search of that D, and called through ctypes, which releases the GIL: parts of
one search run on threads at once. Where it cannot be compiled, keysearch keeps its bmm path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading

import torch

log = logging.getLogger(__name__)

# Above this many coordinates (d_k + 1) the inputs no longer fit in vector registers: keysearch's bmm path.
MAX_DIM = 24
_INF = "0x7FF0000000000000"  # +inf as LLVM IR writes a float constant
_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
_lock = threading.Lock()


@functools.cache
def lanes() -> int:
    """Inputs scored at once (a vector register's floats): 16 where the CPU has AVX-512, else 8."""
    import llvmlite.binding as llvm

    return 16 if "+avx512f" in llvm.get_host_cpu_features().flatten().split(",") else 8


def _score(dim: int, w: int) -> list[str]:
    """IR of key %k's scores for the W inputs of a block (%zv0.. in registers): %acc{dim-1} (<W x float>)."""
    vec = f"<{w} x float>"
    lines = ["  %kbase = mul i64 %k, " + str(dim)]
    for j in range(dim):
        lines += [f"  %ki{j} = add i64 %kbase, {j}",
                  f"  %kp{j} = getelementptr float, ptr %ka, i64 %ki{j}",
                  f"  %ks{j} = load float, ptr %kp{j}, align 4",
                  f"  %kx{j} = insertelement {vec} poison, float %ks{j}, i32 0",
                  f"  %kv{j} = shufflevector {vec} %kx{j}, {vec} poison, <{w} x i32> zeroinitializer"]
        if j == 0:
            lines.append(f"  %acc0 = fmul {vec} %kv0, %zv0")
        else:
            lines.append(f"  %acc{j} = call {vec} @llvm.fma.v{w}f32({vec} %kv{j}, {vec} %zv{j}, {vec} %acc{j - 1})")
    return lines


def _splat(w: int, value: str) -> str:
    """An IR vector constant of W copies of `value` (e.g. "float 0x7FF0000000000000")."""
    return "<" + ", ".join([value] * w) + ">"


def _kernel(name: str, dim: int, w: int, mode: str, masked: bool) -> list[str]:
    """IR of one kernel (ka, z, zstride, nkeys, nblocks, blocked, out, kk, best): blocks of W inputs outer, keys
    inner; mode top1 or topk.

    ka (K, dim) float32 rows; z (dim, zstride) float32, block b's inputs in columns b*W..b*W+W-1; blocked (K,)
    bytes, non-zero = the key scores +inf (read only when `masked`). out: top1, (zstride,) int64 indices; topk,
    (zstride, kk) int64 indices in (score, index) order, -1 where fewer than kk keys score below +inf, with best
    (W, kk) float32 scratch. nkeys, nblocks and kk are at least 1.
    """
    vec, ivec, mask = f"<{w} x float>", f"<{w} x i32>", f"<{w} x i1>"
    inf = f"float {_INF}"
    score = f"%acc{dim - 1}"
    lines = [f"define void @{name}(ptr noalias %ka, ptr noalias %z, i64 %zstride, i64 %nkeys, i64 %nblocks, "
             f"ptr noalias %blocked, ptr noalias %out, i64 %kk, ptr noalias %best) #0 {{",
             "entry:"]
    if mode == "topk":
        lines.append(f"  %sbuf = alloca {vec}, align 64")
    lines += ["  br label %block",
              "block:",
              "  %b = phi i64 [0, %entry], [%bnext, %blockend]",
              f"  %s0 = mul i64 %b, {w}"]
    for j in range(dim):  # the block's inputs, coordinate j in register %zv{j}
        lines += [f"  %zo{j} = mul i64 %zstride, {j}",
                  f"  %zi{j} = add i64 %zo{j}, %s0",
                  f"  %zp{j} = getelementptr float, ptr %z, i64 %zi{j}",
                  f"  %zv{j} = load {vec}, ptr %zp{j}, align 4"]
    if mode == "topk":  # each lane's kk best so far: scores +inf, indices -1
        lines += ["  %slots = mul i64 %kk, " + str(w),
                  "  %obase = mul i64 %s0, %kk",
                  "  br label %init",
                  "init:",
                  "  %ii = phi i64 [0, %block], [%iinext, %init]",
                  "  %bip = getelementptr float, ptr %best, i64 %ii",
                  f"  store {inf}, ptr %bip, align 4",
                  "  %oii = add i64 %obase, %ii",
                  "  %oip = getelementptr i64, ptr %out, i64 %oii",
                  "  store i64 -1, ptr %oip, align 8",
                  "  %iinext = add i64 %ii, 1",
                  "  %idone = icmp eq i64 %iinext, %slots",
                  "  br i1 %idone, label %key, label %init"]
    else:
        lines.append("  br label %key")
    start = "%init" if mode == "topk" else "%block"
    lines += ["key:", f"  %k = phi i64 [0, {start}], [%knext, %next]"]
    if mode == "top1":
        lines += [f"  %best0 = phi {vec} [{_splat(w, inf)}, {start}], [%best1, %next]",
                  f"  %idx = phi {ivec} [zeroinitializer, {start}], [%idx1, %next]"]
    if mode == "topk":
        lines.append(f"  %cut = phi {vec} [{_splat(w, inf)}, {start}], [%cut2, %next]")
    lines += _score(dim, w)
    if masked:
        lines += ["  %bp = getelementptr i8, ptr %blocked, i64 %k",
                  "  %bv = load i8, ptr %bp, align 1",
                  "  %isb = icmp ne i8 %bv, 0",
                  f"  %sc = select i1 %isb, {vec} {_splat(w, inf)}, {vec} {score}"]
        score = "%sc"
    if mode == "top1":  # strict <: of equal scores the lower key index, met first, stays
        lines += [f"  %lt = fcmp olt {vec} {score}, %best0",
                  f"  %best1 = select {mask} %lt, {vec} {score}, {vec} %best0",
                  "  %k32 = trunc i64 %k to i32",
                  f"  %kx = insertelement {ivec} poison, i32 %k32, i32 0",
                  f"  %kvec = shufflevector {ivec} %kx, {ivec} poison, <{w} x i32> zeroinitializer",
                  f"  %idx1 = select {mask} %lt, {ivec} %kvec, {ivec} %idx",
                  "  br label %next",
                  "next:"]
    else:  # topk: lanes scoring below their kk-th best so far insert the key into their sorted lists, one by one
        lines += [f"  %lt = fcmp olt {vec} {score}, %cut",
                  f"  %bits = bitcast {mask} %lt to i{w}",
                  f"  %any = icmp ne i{w} %bits, 0",
                  "  br i1 %any, label %insert, label %next",
                  "insert:",
                  f"  store {vec} {score}, ptr %sbuf, align 64",
                  "  br label %lane",
                  "lane:",
                  f"  %m = phi i{w} [%bits, %insert], [%mnext, %place]",
                  f"  %cutl = phi {vec} [%cut, %insert], [%cutn, %place]",
                  f"  %ln = call i{w} @llvm.cttz.i{w}(i{w} %m, i1 true)",
                  f"  %m1 = sub i{w} %m, 1",
                  f"  %mnext = and i{w} %m, %m1",
                  f"  %l64 = zext i{w} %ln to i64",
                  "  %vp = getelementptr float, ptr %sbuf, i64 %l64",
                  "  %v = load float, ptr %vp, align 4",
                  "  %row = mul i64 %l64, %kk",
                  "  %os = add i64 %s0, %l64",
                  "  %orow = mul i64 %os, %kk",
                  "  %last = sub i64 %kk, 1",
                  "  br label %shift",
                  "shift:",  # p from kk - 1 down: the larger scores move one place; equal ones stay ahead
                  "  %p = phi i64 [%last, %lane], [%pm1, %move]",
                  "  %more = icmp sgt i64 %p, 0",
                  "  br i1 %more, label %compare, label %place",
                  "compare:",
                  "  %pm1 = sub i64 %p, 1",
                  "  %bq = add i64 %row, %pm1",
                  "  %bqp = getelementptr float, ptr %best, i64 %bq",
                  "  %prev = load float, ptr %bqp, align 4",
                  "  %gt = fcmp ogt float %prev, %v",
                  "  br i1 %gt, label %move, label %place",
                  "move:",
                  "  %bdst = add i64 %row, %p",
                  "  %bdp = getelementptr float, ptr %best, i64 %bdst",
                  "  store float %prev, ptr %bdp, align 4",
                  "  %oq = add i64 %orow, %pm1",
                  "  %oqp = getelementptr i64, ptr %out, i64 %oq",
                  "  %oprev = load i64, ptr %oqp, align 8",
                  "  %odst = add i64 %orow, %p",
                  "  %odp = getelementptr i64, ptr %out, i64 %odst",
                  "  store i64 %oprev, ptr %odp, align 8",
                  "  br label %shift",
                  "place:",
                  "  %bat = add i64 %row, %p",
                  "  %batp = getelementptr float, ptr %best, i64 %bat",
                  "  store float %v, ptr %batp, align 4",
                  "  %oat = add i64 %orow, %p",
                  "  %oatp = getelementptr i64, ptr %out, i64 %oat",
                  "  store i64 %k, ptr %oatp, align 8",
                  "  %blast = add i64 %row, %last",
                  "  %blp = getelementptr float, ptr %best, i64 %blast",
                  "  %newcut = load float, ptr %blp, align 4",
                  f"  %cutn = insertelement {vec} %cutl, float %newcut, i{w} %ln",
                  f"  %lanesdone = icmp eq i{w} %mnext, 0",
                  "  br i1 %lanesdone, label %next, label %lane",
                  "next:",
                  f"  %cut2 = phi {vec} [%cut, %key], [%cutn, %place]"]
    lines += ["  %knext = add i64 %k, 1",
              "  %kdone = icmp eq i64 %knext, %nkeys",
              "  br i1 %kdone, label %blockend, label %key",
              "blockend:"]
    if mode == "top1":
        lines += [f"  %i64 = zext {ivec} %idx1 to <{w} x i64>",
                  "  %op = getelementptr i64, ptr %out, i64 %s0",
                  f"  store <{w} x i64> %i64, ptr %op, align 8"]
    lines += ["  %bnext = add i64 %b, 1",
              "  %bdone = icmp eq i64 %bnext, %nblocks",
              "  br i1 %bdone, label %exit, label %block",
              "exit:", "  ret void", "}"]
    return lines


KERNELS = ("top1", "topk")


def module_ir(dim: int, w: int) -> str:
    """The kernels for `dim` coordinates and W lanes: each of KERNELS, and each again with _masked."""
    lines = [f"declare <{w} x float> @llvm.fma.v{w}f32(<{w} x float>, <{w} x float>, <{w} x float>)",
             f"declare i{w} @llvm.cttz.i{w}(i{w}, i1)"]
    for mode in KERNELS:
        for masked in (False, True):
            lines += _kernel(mode + ("_masked" if masked else ""), dim, w, mode, masked)
    # W-float vectors in full-width registers (LLVM splits 512-bit vectors in two unless told they may stay whole)
    lines.append(f'attributes #0 = {{ nounwind "min-legal-vector-width"="{32 * w}" '
                 f'"prefer-vector-width"="{32 * w}" }}')
    return "\n".join(lines) + "\n"


class Kernels:
    """The compiled kernels of one `dim`: call top1 / topk with torch tensors (checked: they take raw pointers)."""

    def __init__(self, dim: int):
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        self.dim, self.lanes = dim, lanes()
        module = llvm.parse_assembly(module_ir(dim, self.lanes))
        module.verify()
        machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
        self._engine = llvm.create_mcjit_compiler(module, machine)  # owns the machine code: kept with self
        self._engine.finalize_object()
        self._fn = {name + masked: _SIGNATURE(self._engine.get_function_address(name + masked))
                    for name in KERNELS for masked in ("", "_masked")}

    def _call(self, name: str, ka: torch.Tensor, z: torch.Tensor, blocked: torch.Tensor | None,
              out: torch.Tensor, best: torch.Tensor | None = None) -> None:
        num_keys, stride = ka.shape[0], z.shape[1]
        k = 1 if best is None else out.shape[1]
        # the kernel reads and writes through raw pointers: a wrong shape or layout must stop here
        ok = (ka.dtype == z.dtype == torch.float32 and ka.shape == (num_keys, self.dim) and ka.is_contiguous()
              and z.shape[0] == self.dim and z.is_contiguous() and stride % self.lanes == 0 and num_keys > 0
              and stride > 0 and out.dtype == torch.int64 and out.is_contiguous() and out.numel() == stride * k
              and (blocked is None or (blocked.dtype == torch.bool and blocked.shape == (num_keys,)
                                       and blocked.is_contiguous()))
              and (best is None or (best.dtype == torch.float32 and best.is_contiguous()
                                    and best.numel() == self.lanes * k)))
        if not ok:
            raise ValueError(f"score_kernel.{name}: ka (K, {self.dim}) float32, z ({self.dim}, n) float32 with n a "
                             f"multiple of {self.lanes}, out (n[, k]) int64, blocked (K,) bool, all contiguous; got "
                             f"ka {tuple(ka.shape)} {ka.dtype}, z {tuple(z.shape)} {z.dtype}, out {tuple(out.shape)} "
                             f"{out.dtype}")
        self._fn[name + ("_masked" if blocked is not None else "")](
            ka.data_ptr(), z.data_ptr(), stride, num_keys, stride // self.lanes,
            None if blocked is None else blocked.data_ptr(), out.data_ptr(), k,
            None if best is None else best.data_ptr())

    def top1(self, ka: torch.Tensor, z: torch.Tensor, blocked: torch.Tensor | None, out: torch.Tensor) -> None:
        """ka (K, dim) float32 contiguous, z (dim, n) float32 contiguous with n a multiple of `lanes`, blocked
        (K,) bool or None -> out (n,) int64 contiguous: each column's nearest key, ties to the lowest index."""
        self._call("top1", ka, z, blocked, out)

    def topk(self, ka: torch.Tensor, z: torch.Tensor, blocked: torch.Tensor | None, out: torch.Tensor,
             best: torch.Tensor) -> None:
        """As top1, but out (n, k) int64 contiguous := each column's k nearest keys in (score, index) order, -1
        where fewer than k keys score below +inf (keysearch fills those places); best: (lanes, k) float32 scratch."""
        self._call("topk", ka, z, blocked, out, best)


_kernels: dict[int, Kernels | None] = {}


def kernels(dim: int) -> Kernels | None:
    """The kernels for `dim` coordinates (d_k + 1), compiled at the first call; None where they cannot be (too
    many coordinates, or no compiler for this CPU: said once in the log)."""
    if dim > MAX_DIM:
        return None
    with _lock:
        if dim not in _kernels:
            try:
                _kernels[dim] = Kernels(dim)
            except Exception as err:  # llvmlite missing or no target for this CPU: the bmm path still serves
                log.warning("nearest-key search: no compiled score kernel (%s: %s); scores go through bmm",
                            type(err).__name__, err)
                _kernels[dim] = None
        return _kernels[dim]
