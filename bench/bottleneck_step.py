"""Time one value-training step of the Discrete Key-Value Bottleneck: the reference package against clorch.

One step = forward + backward + SGD update of the values (batch 256) at the paper's sizes: ResNet-50 embedding
D=2048, C=256 codebooks of K=4096 keys, key dim 14, value dim 10 (classes), top-1 lookup, vote decoder (mean of
the fetched values over codebooks = logits), cross entropy with label smoothing 0.1, SGD lr 0.3 without momentum,
gradient clipping at norm 1.0. Rows:

  package      discrete-key-value-bottleneck-pytorch, keys frozen, values trained by torch.optim.SGD
  dense        clorch's KeyValueBottleneck through plain autograd (lookup + dense value gradient + SGD)
  sparse       clorch's lookup, then sparse_sgd_step (reads and writes only the selected value rows)
  index cache  sparse_sgd_step alone, on indices looked up once beforehand: on the CPU, the compiled step
               (workloads/sparse_step.py), on the table clorch keeps (bottleneck.value_table: each row padded to
               its own cache line)
  unpadded     the same compiled step on a contiguous table (40-byte rows, half of them across two cache
               lines), timed in turns with the index cache row
  torch step   torch_sparse_sgd_step alone (the step in torch operations, the CPU's step before the compiled
               one and still the GPU's), timed in turns with the index cache row, on the same indices, so that
               their ratio is measured under the same load
  columns      the compiled step as it was before its rows were handled whole (bench/column_step.py: scalar
               loops, one class column at a time), timed in turns with the index cache row (the same bits)
The index cache's variants take turns 8 steps at a time (threads left spinning by one variant slow only the
first step of the next turn).

plus one epoch of a paper CIFAR-10 stage with the index cache (10,000 embeddings, 40 shuffled batches) through
the runner's stage loop (workloads.runner.train_stage) and the DKVB learner's observe step (usage counters included),
with sparse_sgd_step and, in turns, with the compiled step on unpadded rows, with the torch step and with the
column step (each on a learner of its own, the torch step's with the contiguous table it was written for).
Medians of the timed repeats after warm-up; the speedup column is a ratio to the package (to the dense path
when the package is not installed).

    python bench/bottleneck_step.py                 # paper sizes: the package needs ~12 GB of RAM and ~10 s a step
    python bench/bottleneck_step.py --small         # quick smoke run at toy sizes
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import column_step  # bench/column_step.py (scripts run from bench/)
import torch
import torch.nn.functional as F
from timing import alternating_median_times, median_time  # bench/timing.py (scripts run from bench/)
from torch import nn

from workloads import sparse_step
from workloads.bottleneck import (KeyValueBottleneck, learn_keys, sparse_sgd_step, torch_sparse_sgd_step,
                                  value_table)
from workloads.config import parse_run_config
from workloads.data.streams import Stage
from workloads.learners.base import LearnerContext
from workloads.learners.dkvb import DKVB
from workloads.runner import train_stage

LR, CLIP, SMOOTHING = 0.3, 1.0, 0.1
TURN_STEPS = 8  # steps of one variant in a row, when the index cache's variants take turns
EPOCH_BUDGET_S = 0.06  # issue 13's goal for a quiet 2-core machine


@dataclass(frozen=True)
class Sizes:
    input_dim: int = 2048
    codebooks: int = 256
    keys: int = 4096
    key_dim: int = 14
    value_dim: int = 10
    batch: int = 256
    stage: int = 10_000  # embeddings in one CIFAR-10 stage (one epoch = ceil(stage / batch) steps)


PAPER, SMALL = Sizes(), Sizes(input_dim=256, codebooks=16, keys=256, stage=1_000)


def autograd_step(model: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                  opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Cross entropy on the vote logits model(x) (B, d_v), backward, clip, SGD step."""
    loss = F.cross_entropy(model(x), y, label_smoothing=SMOOTHING)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()


@contextlib.contextmanager
def torch_value_step():
    """Within: the DKVB bottleneck takes the torch value step (usage counted deferred), the CPU's step before the
    compiled one (workloads/sparse_step.py), as the reference the compiled one is timed against."""
    supports, sparse_step.supports = sparse_step.supports, lambda *_: False
    try:
        yield
    finally:
        sparse_step.supports = supports


def build_package(s: Sizes, pool: torch.Tensor) -> nn.Module | None:
    """The reference bottleneck with keys drawn from projected inputs and frozen; None if not installed."""
    try:
        from discrete_key_value_bottleneck_pytorch import DiscreteKeyValueBottleneck
    except ImportError:
        return None
    # dim is the per-codebook key dim and codebook_dim (passed through to VectorQuantize) must equal it:
    # otherwise VectorQuantize inserts a Linear(C*d_k -> C*codebook_dim) in front of the codebooks.
    # VectorQuantize learns its codebook (the keys) by EMA updates in every training-mode forward.
    # freeze_codebook=True is the package's switch that turns this off; eval mode on the quantizer also skips
    # its one-hot quantize and commitment loss, which the value path does not use. Only the values train.
    model = DiscreteKeyValueBottleneck(dim=s.key_dim, dim_embed=s.input_dim, num_memories=s.keys,
                                       num_memory_codebooks=s.codebooks, dim_memory=s.value_dim,
                                       codebook_dim=s.key_dim, freeze_codebook=True)
    model.vq.eval()
    with torch.no_grad():
        z = torch.einsum("nd,cde->nce", pool, model.rand_proj)  # the package's own projection, (N, C, d_k)
        model.vq.codebook = learn_keys(z, s.keys, "random")
    return model


@contextlib.contextmanager
def column_value_step():
    """Within: the DKVB bottleneck's compiled step is the column step it replaced (bench/column_step.py)."""
    step, sparse_step.sparse_sgd_step = sparse_step.sparse_sgd_step, column_step.sparse_sgd_step
    try:
        yield
    finally:
        sparse_step.sparse_sgd_step = step


def paper_learner(s: Sizes, bottleneck: KeyValueBottleneck) -> DKVB:
    """A DKVB learner with the dkvb_paper_model preset at sizes s, sharing `bottleneck`'s projection and keys."""
    config = parse_run_config({"preset": "dkvb_paper_model", "learner": {
        "name": "dkvb", "num_codebooks": s.codebooks, "num_keys": s.keys, "key_dim": s.key_dim}})
    ctx = LearnerContext(num_classes=s.value_dim, input_dim=s.input_dim, train=config.train, seed=0,
                         device=torch.device("cpu"))
    learner = DKVB(config.learner, ctx)
    learner.bottleneck.load_state_dict(bottleneck.state_dict())
    return learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of each clorch row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps of each clorch row")
    parser.add_argument("--package-repeats", type=int, default=3, help="timed repeats of the package (1 warm-up)")
    parser.add_argument("--small", action="store_true", help="toy sizes for a quick smoke run")
    args = parser.parse_args()
    s = SMALL if args.small else PAPER

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"D={s.input_dim} C={s.codebooks} K={s.keys} d_k={s.key_dim} d_v={s.value_dim} batch={s.batch}")
    # Data-like inputs: ResNet-50 pooled embeddings are non-negative. The pool doubles as the stage's embeddings.
    pool = torch.randn(max(s.stage, s.keys), s.input_dim).relu()
    labels = torch.randint(s.value_dim, (len(pool),))
    x, y = pool[: s.batch], labels[: s.batch]

    rows: dict[str, float] = {}
    package = build_package(s, pool)
    if package is None:
        print("discrete-key-value-bottleneck-pytorch is not installed (pip install -e .[bench]); "
              "ratios are relative to clorch's dense path")
    else:
        params = [p for p in package.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=LR)
        logits = lambda inp: package(inp.unsqueeze(1))[:, 0]  # (B, 1, d_v), already averaged over codebooks
        rows["package (discrete-key-value-bottleneck-pytorch)"] = median_time(
            lambda: autograd_step(logits, params, opt, x, y), 1, args.package_repeats)
        del package, params, opt

    bottleneck = KeyValueBottleneck(input_dim=s.input_dim, num_codebooks=s.codebooks, num_keys=s.keys,
                                    key_dim=s.key_dim, value_dim=s.value_dim, topk=1)
    with torch.no_grad():
        bottleneck.keys.copy_(learn_keys(bottleneck.project(pool), s.keys, "random"))
        cache = bottleneck.lookup(bottleneck.project(pool))  # (N, C, 1): the index cache
    values = bottleneck.values
    opt = torch.optim.SGD([values], lr=LR)
    rows["clorch dense autograd (lookup + backward + SGD)"] = median_time(
        lambda: autograd_step(lambda inp: bottleneck(inp).mean(1), [values], opt, x, y), args.warmup, args.repeats)

    def sparse() -> None:
        with torch.no_grad():
            idx = bottleneck.lookup(bottleneck.project(x))
        sparse_sgd_step(values.data, idx, y, LR, CLIP, SMOOTHING)

    rows["clorch sparse update (lookup + sparse step)"] = median_time(sparse, args.warmup, args.repeats)
    # Each step on its own copy of the values, so that both always see the same kind of table.
    step_batches = [cache[i:i + s.batch] for i in range(0, s.stage - s.batch + 1, s.batch)]
    tables = {"compiled": value_table(values.data), "unpadded": values.data.contiguous(),
              "torch": values.data.contiguous(), "columns": value_table(values.data)}
    turn = dict.fromkeys(tables, 0)

    def cached(name: str, fn: Callable[..., float]) -> Callable[[], None]:
        def steps() -> None:  # a new batch each step, as in an epoch: its rows are not left in the caches
            for _ in range(TURN_STEPS):
                turn[name] += 1
                i = turn[name] % len(step_batches)
                fn(tables[name], step_batches[i], labels[i * s.batch:(i + 1) * s.batch], LR, CLIP, SMOOTHING)
        return steps

    # TURN_STEPS steps a turn: threads one step leaves spinning (OpenMP's, numba's or torch's) slow only the
    # first step of the next turn
    paired = {name: sec / TURN_STEPS for name, sec in alternating_median_times(
        {"compiled": cached("compiled", sparse_sgd_step), "unpadded": cached("unpadded", sparse_sgd_step),
         "torch": cached("torch", torch_sparse_sgd_step),
         "columns": cached("columns", column_step.sparse_sgd_step)},
        args.warmup, args.repeats).items()}
    rows["clorch index cache (sparse step only)"] = paired["compiled"]
    rows["clorch index cache, unpadded rows"] = paired["unpadded"]
    rows["clorch index cache, torch step"] = paired["torch"]
    rows["clorch index cache, column step"] = paired["columns"]
    # the same steps on the same batches: the same bits but for the torch step, which agrees to float32 rounding
    # (its sums in other orders)
    assert torch.equal(tables["compiled"], tables["unpadded"]), "padding the rows changed the values"
    assert torch.equal(tables["compiled"], tables["columns"]), "whole rows changed the values of the column step"
    drift = float((tables["compiled"] - tables["torch"]).abs().max())
    moved = float((tables["torch"] - values.data).abs().max())
    assert drift <= 1e-3 * moved, f"the compiled step's values drift from the torch step's: {drift:.3g} of {moved:.3g}"

    # The epoch goes through the runner's stage loop and the DKVB learner (index cache, usage counters, sparse
    # step), as in a run; the stage's lookup is done once here, outside the timed epochs.
    learners = {name: paper_learner(s, bottleneck) for name in ("compiled", "unpadded", "torch", "columns")}
    stage_idx, stage_y = learners["compiled"].stage_inputs(pool[: s.stage]), labels[: s.stage]
    stage = Stage(0, tuple(range(s.value_dim)), pool[: s.stage], stage_y, pool[:0], stage_y[:0])
    for name, learner in learners.items():
        if name in ("unpadded", "torch"):
            learner.bottleneck.values.data = learner.bottleneck.values.data.contiguous()
        learner.stage_inputs = lambda _: stage_idx
        learner.begin_stage(stage)
    one_epoch = parse_run_config({"preset": "dkvb_paper_model", "train": {"epochs": 1}})

    def torch_epoch() -> float:
        with torch_value_step():
            return train_stage(learners["torch"], stage, one_epoch, 1)

    def column_epoch() -> float:
        with column_value_step():
            return train_stage(learners["columns"], stage, one_epoch, 1)

    epochs = alternating_median_times(
        {"compiled": lambda: train_stage(learners["compiled"], stage, one_epoch, 1),
         "unpadded": lambda: train_stage(learners["unpadded"], stage, one_epoch, 1), "torch": torch_epoch,
         "columns": column_epoch},
        args.warmup, args.repeats)
    assert torch.equal(learners["compiled"].bottleneck.values, learners["columns"].bottleneck.values)
    epoch_s = epochs["compiled"]

    base = next(iter(rows.values()))
    width = max(map(len, rows))
    print(f"\n{'method':<{width}}  {'s/step':>9}  {'speedup':>9}")
    for name, sec in rows.items():
        print(f"{name:<{width}}  {sec:>9.4f}  {base / sec:>8.1f}x")
    batches = -(-s.stage // s.batch)
    verdict = "under" if epoch_s < EPOCH_BUDGET_S else "NOT under"
    print(f"\none CIFAR-10 stage epoch with the index cache ({s.stage} embeddings, {batches} batches of "
          f"{s.batch}): {epoch_s:.4f} s, {verdict} {EPOCH_BUDGET_S} s")
    print(f"the same epoch timed in turns: unpadded rows {epochs['unpadded']:.4f} s "
          f"({epochs['unpadded'] / epoch_s:.2f}x; step alone {paired['unpadded'] / paired['compiled']:.2f}x), "
          f"torch step {epochs['torch']:.4f} s ({epochs['torch'] / epoch_s:.2f}x; step alone "
          f"{paired['torch'] / paired['compiled']:.2f}x); the compiled and torch steps' values agree to "
          f"{drift:.1e} (rows moved by up to {moved:.1e})")
    print(f"the column step (bench/column_step.py), in turns: an epoch {epochs['columns']:.4f} s "
          f"({epochs['columns'] / epoch_s:.2f}x; step alone {paired['columns'] / paired['compiled']:.2f}x) against "
          f"the step on whole rows ({torch.get_num_threads()} threads; the same bits)")


if __name__ == "__main__":
    main()
