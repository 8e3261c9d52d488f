"""Time clorch's nearest-key search against the search it replaced, and against the machine's sgemm floor.

Paper sizes: C=256 codebooks of K=4096 keys, d_k=14, 50,000 key-learning inputs, CIFAR-10 stages of 10,000
training inputs and 10,000 test inputs. Rows (all measured in this run, on the same inputs):

  baseline      the search before workloads/keysearch.py (kept below as the named reference): the full (C, b, K)
                score tensor by baddbmm in 64M-float chunks, then topk
  new top-1     workloads.keysearch.nearest_keys, k=1 (cache-sized reused tiles, the codebooks in one part per
                torch thread, a compiled first-minimum reduction)
  new top-16    the same, k=16 (the candidates DKVB keeps per evaluation input; a compiled top-k reduction)

floor = score FLOPs (2 N C K d_k) / the sgemm rate of a square matmul measured in the same run. Then one EMA
key-learning epoch (batch 1024, extrapolated from a few batches, its state updated in place as learn_keys has
it) with the old and new search, and with the EMA update before and after it summed only the selected keys'
rows (dense_ema_update, the reference), and a CIFAR-10 stage's fixed cost (look up the stage's training inputs,
then every test input under the unused-key mask) with and without candidate reuse.
The machine may be shared: the ratios of one run are what to read, not the absolute times.

    python bench/key_search.py            # paper sizes (a few minutes)
    python bench/key_search.py --small    # toy sizes, seconds
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass

import torch
import timing  # bench/timing.py (scripts run from bench/)

from workloads.bottleneck import _ema_batch, table_rows
from workloads.keysearch import answer_from_candidates, candidate_dtype, nearest_keys


@dataclass(frozen=True)
class Sizes:
    codebooks: int = 256
    keys: int = 4096
    key_dim: int = 14
    inputs: int = 2048  # timed per row; passes are extrapolated from it
    learn_inputs: int = 50_000
    stage_train: int = 10_000
    test: int = 10_000
    batch: int = 1024  # key learning


PAPER, SMALL = Sizes(), Sizes(codebooks=16, keys=256, key_dim=8, inputs=2048, learn_inputs=5_000,
                              stage_train=1_000, test=1_000)
BASELINE_BUDGET = 64 * 2**20  # the old search's score chunk, in floats
median_time = timing.median_time  # main() picks the clock


def baseline_nearest_keys(z: torch.Tensor, keys: torch.Tensor, k: int = 1,
                          allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The search as workloads.bottleneck had it: full (C, b, K) scores by baddbmm per chunk, then topk."""
    bias = (keys * keys).sum(-1).unsqueeze(1)  # (C, 1, K)
    if allowed is not None:
        bias = bias.masked_fill(~allowed.unsqueeze(1), float("inf"))
    zc = z.transpose(0, 1)  # (C, B, d_k)
    step = max(1, BASELINE_BUDGET // (keys.shape[0] * keys.shape[1]))
    scores = (torch.baddbmm(bias, zc[:, s:s + step], keys.transpose(1, 2), alpha=-2.0)
              for s in range(0, zc.shape[1], step))
    out = [chunk.topk(k, dim=-1, largest=False).indices for chunk in scores]
    return torch.cat(out, 1).transpose(0, 1).contiguous()


def sgemm_rate() -> float:
    """FLOP/s of a square float32 matmul (the machine's practical peak)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / median_time(lambda: a @ b, warmup=1, repeats=3)


def dense_ema_update(z: torch.Tensor, assign: torch.Tensor, count: torch.Tensor, sums: torch.Tensor,
                     decay: float) -> torch.Tensor:
    """learn_keys' EMA update before workloads.bottleneck._ema_batch (the named reference): the batch's sums a
    dense (C, K, d_k) tensor made by torch's index_add_, added to every row of the decayed sums."""
    c, num_keys, d = sums.shape
    flat = table_rows(assign, num_keys)
    batch = torch.zeros(c * num_keys, d).index_add_(0, flat, z.reshape(-1, d)).view_as(sums)
    counts = torch.bincount(flat, minlength=c * num_keys).to(z.dtype).view_as(count)
    count.mul_(decay).add_(counts, alpha=1 - decay)
    sums.mul_(decay).add_(batch, alpha=1 - decay)
    return counts


def ema_batch(search, update, z: torch.Tensor, keys: torch.Tensor, count: torch.Tensor, sums: torch.Tensor):
    """One mini-batch of workloads.bottleneck.learn_keys' EMA k-means: `search` finds the nearest keys, `update`
    decays the counts and sums and adds the batch's, then the keys are the smoothed means, as learn_keys has them."""
    update(z, search(z, keys)[..., 0], count, sums, 0.95)
    total = count.sum(1, keepdim=True)
    torch.div(sums, ((count + 1e-5) / (total + keys.shape[1] * 1e-5) * total).unsqueeze(-1), out=keys)


def clustered(n: int, s: Sizes, centres: torch.Tensor, classes: range, gen: torch.Generator) -> torch.Tensor:
    """(n, C, d_k) projected inputs around per-class centres: stand-ins for a class-incremental stream."""
    labels = torch.tensor(list(classes))[torch.randint(len(classes), (n,), generator=gen)]
    return centres[labels] + 0.7 * torch.randn(n, s.codebooks, s.key_dim, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="toy sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by this process's CPU time, not wall time (steadier on a shared machine; "
                             "with --threads 1 it is the one core's time)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global median_time
    median_time = functools.partial(timing.median_time,
                                    clock=time.process_time if args.cpu_time else time.perf_counter)
    s = SMALL if args.small else PAPER
    gen = torch.Generator().manual_seed(0)
    c, k, d, n = s.codebooks, s.keys, s.key_dim, s.inputs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} "
          f"time; C={c} K={k} d_k={d}, {n} inputs timed")
    z = torch.randn(n, c, d, generator=gen)
    keys = torch.randn(c, k, d, generator=gen)
    rate = sgemm_rate()
    floor = 2 * n * c * k * d / rate
    rows = [("baseline top-1", lambda: baseline_nearest_keys(z, keys, 1)),
            ("new top-1", lambda: nearest_keys(z, keys, 1)),
            ("baseline top-16", lambda: baseline_nearest_keys(z, keys, 16)),
            ("new top-16", lambda: nearest_keys(z, keys, 16))]
    times = {name: median_time(f, warmup=1, repeats=3 if args.small else 1) for name, f in rows}
    assert torch.equal(nearest_keys(z, keys, 1), baseline_nearest_keys(z, keys, 1))  # continuous inputs: no ties
    per_pass = s.learn_inputs / n
    print(f"\nsgemm (2048^3 float32): {rate / 1e9:.1f} GFLOP/s; score floor for {n} inputs: {floor:.3f} s\n")
    print(f"| search | s / {n} inputs | s / {s.learn_inputs} inputs (extrapolated) | x floor | baseline / this |")
    print("|---|---:|---:|---:|---:|")
    for name, _ in rows:
        base = times["baseline top-" + name.split("top-")[1]]
        print(f"| {name} | {times[name]:.3f} | {times[name] * per_pass:.2f} | {times[name] / floor:.2f} "
              f"| {base / times[name]:.1f}x |")

    # one EMA key-learning epoch: a few batches, extrapolated to the epoch's ceil(N / batch)
    batches = math.ceil(s.learn_inputs / s.batch)
    zb = torch.randn(s.batch, c, d, generator=gen)
    variants = {"baseline (old search, dense update)": (baseline_nearest_keys, dense_ema_update),
                "new search, dense update": (nearest_keys, dense_ema_update),
                "new search, sparse update (learn_keys now)": (nearest_keys, _ema_batch)}

    def epoch_time(search, update) -> float:
        # keys, counts and sums made once and updated in place batch after batch, as learn_keys has them (the
        # same work at every call): the time is the batch's, with no copies of the 58 MB state in it
        state = keys.clone(), torch.ones(c, k), keys.clone()
        return batches * median_time(lambda: ema_batch(search, update, zb, *state), warmup=1, repeats=3)

    epoch = {name: epoch_time(search, update) for name, (search, update) in variants.items()}
    base = next(iter(epoch.values()))
    print(f"\n| EMA key learning, one epoch ({s.learn_inputs} inputs, {batches} batches of {s.batch}) | s | "
          "baseline / this |")
    print("|---|---:|---:|")
    for name, sec in epoch.items():
        print(f"| {name} | {sec:.2f} | {base / sec:.1f}x |")
    # the update alone, on one batch's assignments: the epochs above differ by it, within their noise
    assign = nearest_keys(zb, keys, 1)[..., 0]
    state = torch.ones(c, k), keys.clone()  # updated in place, call after call: the same work each time
    update = {name: median_time(lambda: fn(zb, assign, *state, 0.95), warmup=1, repeats=5)
              for name, fn in (("dense", dense_ema_update), ("sparse", _ema_batch))}
    print(f"EMA update of one batch alone: dense {update['dense'] * 1e3:.1f} ms, sparse {update['sparse'] * 1e3:.1f} "
          f"ms ({update['dense'] / update['sparse']:.2f}x; the batch's search {times['new top-1'] * s.batch / n * 1e3:.0f} ms)")

    # A stage's fixed cost: index the stage's training inputs, then look every test input up under the mask.
    # Keys drawn from stage 1's inputs (2 of 10 classes), the mask from what stage 1's training inputs selected:
    # test inputs of the 8 unseen classes find many of their nearest keys masked.
    centres = 1.5 * torch.randn(10, c, d, generator=gen)
    train = clustered(n, s, centres, range(2), gen)
    test = clustered(n, s, centres, range(10), gen)
    keys1 = clustered(k, s, centres, range(2), gen).transpose(0, 1).contiguous()  # 'random' keys, stage 1's
    used = torch.zeros(c, k, dtype=torch.bool)
    used[torch.arange(c).view(1, c), nearest_keys(train, keys1, 1)[..., 0]] = True
    plain = median_time(lambda: nearest_keys(test, keys1, 1, used), warmup=1, repeats=1)
    old = median_time(lambda: baseline_nearest_keys(test, keys1, 1, used), warmup=1, repeats=1)
    train_new = times["new top-1"] * s.stage_train / n
    train_old = times["baseline top-1"] * s.stage_train / n
    print(f"\n| one stage's fixed cost ({s.stage_train} training + {s.test} test inputs) | m | pairs searched "
          "in full | training lookup s | evaluation s | s / stage | baseline / this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    old_eval = old * s.test / n
    old_stage = train_old + old_eval

    def line(name: str, m: str, short: str, train_s: float, eval_s: float) -> None:
        total = train_s + eval_s
        print(f"| {name} | {m} | {short} | {train_s:.2f} | {eval_s:.2f} | {total:.2f} | {old_stage / total:.1f}x |")

    line("baseline (old search, no reuse)", "-", "all", train_old, old_eval)
    line("new search, no reuse", "-", "all", train_new, plain * s.test / n)
    for m in (8, 16, 32):
        cand = nearest_keys(test, keys1, m).to(candidate_dtype(k))
        ok = used[torch.arange(c).view(1, c, 1), cand.long()]
        short = float((~ok.any(-1)).float().mean())
        reuse = median_time(lambda: answer_from_candidates(cand, test, keys1, 1, used), warmup=1, repeats=3)
        assert torch.equal(answer_from_candidates(cand, test, keys1, 1, used), nearest_keys(test, keys1, 1, used))
        once = median_time(lambda: nearest_keys(test, keys1, m), warmup=0, repeats=1) * s.test / n
        line(f"new search + candidate reuse (candidates, once per run: {once:.1f} s)", str(m),
             f"{100 * short:.2f}%", train_new, reuse * s.test / n)


if __name__ == "__main__":
    main()
