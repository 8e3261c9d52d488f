"""The nearest-key search's CPU kernel: each score made in vector registers and used at once, never stored.

keysearch ranks the keys of a codebook by score(z, key) = [z, 1] . [-2 key, ||key||^2] (its module doc). Here
that dot product runs for W inputs at once, one lane each: the inputs' D = d_k + 1 coordinates sit in D vector
registers for the whole walk over the codebook's keys, and each key's score is one product and D - 1 fused
multiply-adds (coordinate 0 first, ||key||^2 last), each rounded as an FMA rounds. Top-1 keeps each lane's
first minimum as it goes (a strict <, keys in index order); for top-k the scores are written to a tile that
keysearch's top-k reduction ranks, so that both rank keys by the same bits.

Why: with the scores first written by torch.bmm (MKL) into a 4 MiB tile and then read back by a reduction,
one tile of 256 inputs x 4096 keys of d_k=14 took 0.52 ms on one core of this project's 2-core machine, plus
~0.1 ms of Python per tile; this kernel takes 0.23 ms, close to the sgemm rate for the same FLOPs. A score is
computed the same way whatever else shares its tile, so searches of any tiling, mask or k agree bit for bit.

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
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
_lock = threading.Lock()


@functools.cache
def lanes() -> int:
    """Inputs scored at once (a vector register's floats): 16 where the CPU has AVX-512, else 8."""
    import llvmlite.binding as llvm

    return 16 if "+avx512f" in llvm.get_host_cpu_features().flatten().split(",") else 8


def _score(dim: int, w: int) -> list[str]:
    """IR of one key's scores for the W inputs of a block: %acc{dim-1} (<W x float>), +inf where %blocked."""
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


def _kernel(name: str, dim: int, w: int, top1: bool, masked: bool) -> list[str]:
    """IR of one kernel: (ka, z, zstride, nkeys, nblocks, blocked, out), blocks of W inputs outer, keys inner.

    ka (K, dim) float32 rows; z (dim, zstride) float32, block b's inputs in columns b*W..b*W+W-1; blocked (K,)
    bytes, non-zero = the key scores +inf (read only when `masked`); out: top-1, (zstride,) int64 indices;
    else the scores, (K, zstride) float32. nkeys and nblocks are at least 1.
    """
    vec, ivec = f"<{w} x float>", f"<{w} x i32>"
    score = f"%acc{dim - 1}"
    lines = [f"define void @{name}(ptr noalias %ka, ptr noalias %z, i64 %zstride, i64 %nkeys, i64 %nblocks, "
             f"ptr noalias %blocked, ptr noalias %out) #0 {{",
             "entry:", "  br label %block",
             "block:",
             "  %b = phi i64 [0, %entry], [%bnext, %blockend]",
             f"  %s0 = mul i64 %b, {w}"]
    for j in range(dim):  # the block's inputs, coordinate j in register %zv{j}
        lines += [f"  %zo{j} = mul i64 %zstride, {j}",
                  f"  %zi{j} = add i64 %zo{j}, %s0",
                  f"  %zp{j} = getelementptr float, ptr %z, i64 %zi{j}",
                  f"  %zv{j} = load {vec}, ptr %zp{j}, align 4"]
    lines += ["  br label %key", "key:", "  %k = phi i64 [0, %block], [%knext, %key]"]
    if top1:
        lines += [f"  %best = phi {vec} [<" + ", ".join([f"float {_INF}"] * w) + f">, %block], [%best1, %key]",
                  f"  %idx = phi {ivec} [zeroinitializer, %block], [%idx1, %key]"]
    lines += _score(dim, w)
    if masked:
        lines += ["  %bp = getelementptr i8, ptr %blocked, i64 %k",
                  "  %bv = load i8, ptr %bp, align 1",
                  "  %isb = icmp ne i8 %bv, 0",
                  f"  %sc = select i1 %isb, {vec} <" + ", ".join([f"float {_INF}"] * w) + f">, {vec} {score}"]
        score = "%sc"
    if top1:  # strict <: of equal scores the lower key index, met first, stays
        lines += [f"  %lt = fcmp olt {vec} {score}, %best",
                  f"  %best1 = select <{w} x i1> %lt, {vec} {score}, {vec} %best",
                  "  %k32 = trunc i64 %k to i32",
                  f"  %kx = insertelement {ivec} poison, i32 %k32, i32 0",
                  f"  %kvec = shufflevector {ivec} %kx, {ivec} poison, <{w} x i32> zeroinitializer",
                  f"  %idx1 = select <{w} x i1> %lt, {ivec} %kvec, {ivec} %idx"]
    else:
        lines += ["  %to = mul i64 %k, %zstride",
                  "  %ti = add i64 %to, %s0",
                  "  %tp = getelementptr float, ptr %out, i64 %ti",
                  f"  store {vec} {score}, ptr %tp, align 4"]
    lines += ["  %knext = add i64 %k, 1",
              "  %kdone = icmp eq i64 %knext, %nkeys",
              "  br i1 %kdone, label %blockend, label %key",
              "blockend:"]
    if top1:
        lines += [f"  %i64 = zext {ivec} %idx1 to <{w} x i64>",
                  "  %op = getelementptr i64, ptr %out, i64 %s0",
                  f"  store <{w} x i64> %i64, ptr %op, align 8"]
    lines += ["  %bnext = add i64 %b, 1",
              "  %bdone = icmp eq i64 %bnext, %nblocks",
              "  br i1 %bdone, label %exit, label %block",
              "exit:", "  ret void", "}"]
    return lines


def module_ir(dim: int, w: int) -> str:
    """The four kernels for `dim` coordinates and W lanes: top1, top1_masked, scores, scores_masked."""
    lines = [f"declare <{w} x float> @llvm.fma.v{w}f32(<{w} x float>, <{w} x float>, <{w} x float>)"]
    for top1 in (True, False):
        for masked in (False, True):
            name = ("top1" if top1 else "scores") + ("_masked" if masked else "")
            lines += _kernel(name, dim, w, top1, masked)
    # W-float vectors in full-width registers (LLVM splits 512-bit vectors in two unless told they may stay whole)
    lines.append(f'attributes #0 = {{ nounwind "min-legal-vector-width"="{32 * w}" '
                 f'"prefer-vector-width"="{32 * w}" }}')
    return "\n".join(lines) + "\n"


class Kernels:
    """The compiled kernels of one `dim`: call top1 / scores with torch tensors."""

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
        self._fn = {name: _SIGNATURE(self._engine.get_function_address(name))
                    for name in ("top1", "top1_masked", "scores", "scores_masked")}

    def _call(self, name: str, ka: torch.Tensor, z: torch.Tensor, blocked: torch.Tensor | None,
              out: torch.Tensor) -> None:
        num_keys, stride = ka.shape[0], z.shape[1]
        self._fn[name + ("_masked" if blocked is not None else "")](
            ka.data_ptr(), z.data_ptr(), stride, num_keys, stride // self.lanes,
            None if blocked is None else blocked.data_ptr(), out.data_ptr())

    def top1(self, ka: torch.Tensor, z: torch.Tensor, blocked: torch.Tensor | None, out: torch.Tensor) -> None:
        """ka (K, dim) float32 contiguous, z (dim, n) float32 contiguous with n a multiple of `lanes`, blocked
        (K,) bool or None -> out (n,) int64 contiguous: each column's nearest key, ties to the lowest index."""
        self._call("top1", ka, z, blocked, out)

    def scores(self, ka: torch.Tensor, z: torch.Tensor, blocked: torch.Tensor | None, out: torch.Tensor) -> None:
        """As top1, but out (K, n) float32 contiguous := every score (+inf where blocked)."""
        self._call("scores", ka, z, blocked, out)


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
