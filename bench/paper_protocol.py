"""The DKVB paper's CIFAR-10 protocol, phase by phase: seconds measured, the full protocol extrapolated, a floor.

The protocol (Träuble et al. 2023, search_spaces/dkvb_cifar10_paper.yaml): 50,000 training and 10,000 test
embeddings of D=2048 (a frozen ResNet-50), 5 stages of 2 classes (10,000 training embeddings each), C=256
codebooks of K=4096 keys (d_k=14) learned by EMA k-means, 10 epochs, on 50,000 unlabelled embeddings, then
2000 epochs per stage of value training (batch 256, SGD, the index cache), every stage's test set scored after
each stage. Phases, each through clorch's public functions (a faster key search lands here by itself):

  load         synthetic embeddings of the real sizes drawn (or --npz read): measured whole
  key learning learn_keys(ema) for one epoch on --key-inputs projected inputs (after a warm-up call), scaled to
               50,000 x 10 epochs (its fixed cost per call, keys sampled and state made, scaled with it: an
               overestimate, ~0.1 s per call at paper sizes, so about 3 s of the default's 16,384 x 31)
  lookup       the DKVB learner's stage_inputs (projection + nearest keys) on one stage's 10,000, x 5 stages
  epochs       runner.train_stage for --epochs epochs on the index cache, scaled to 2000 x 5 stages, in blocks
               of 5 epochs, each one train_stage call (as a run makes one for its 2000) after an untimed epoch
               (as in a run, each epoch follows one on the same table); each block is followed by one with the
               torch value step (the CPU's before the compiled one, on a learner of its own), whose time is
               printed beside it as the reference measured under the same load
  candidates   the DKVB learner's eval_inputs on --eval-inputs test embeddings (their nearest keys, found once
               per run), scaled to 10,000
  evaluation   runner.evaluate on those candidates (each stage's unused-key mask answered from them, a full
               search only where they run out), scaled to 10,000 after each of 5 stages

Floors, measured in the same run: FLOPs of the projections and key scores (2 N C K d_k) at the measured sgemm
rate; for epochs, the bytes a step must move (every selected value row gathered and written back, d_v floats
each) at the measured memcpy bandwidth. References: the reference package's step
(discrete-key-value-bottleneck-pytorch, timed as bench/bottleneck_step.py times it) x the protocol's steps.

    python bench/paper_protocol.py            # paper sizes: ~1 GB of inputs, a few minutes on 2 cores
    python bench/paper_protocol.py --small    # toy sizes, seconds
    python bench/paper_protocol.py --npz embeddings.npz   # cached real embeddings: x_train y_train x_test y_test
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time

import numpy as np
import torch
from bottleneck_step import (PAPER, SMALL, autograd_step, build_package,  # bench/ (run from bench/)
                             paper_learner, torch_value_step)
from timing import median_time

from workloads.bottleneck import KeyValueBottleneck, learn_keys
from workloads.config import parse_run_config
from workloads.data.streams import make_stream
from workloads.runner import evaluate, train_stage
from workloads.threads import use_threads

STAGES, CLASSES, EPOCHS_PER_STAGE, KEY_EPOCHS = 5, 10, 2000, 10
EPOCH_BLOCK = 5  # timed epochs of one step in a row, before the other step's turn
TRAIN, TEST, UNLABELLED = 50_000, 10_000, 50_000  # CIFAR-10 train / test, CIFAR-100 train (keys)


def load(args, s) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test, unlabelled): the npz's (its x_train doubles as the unlabelled set), or
    synthetic non-negative embeddings (as ResNet-50's pooled features are) of the protocol's sizes."""
    if args.npz:
        with np.load(args.npz) as f:
            x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(f[k]))
                                                for k in ("x_train", "y_train", "x_test", "y_test"))
        return x_train.float(), y_train.long(), x_test.float(), y_test.long(), x_train.float()
    scale = 1 if s is PAPER else 10  # --small: a tenth of the inputs
    gen = torch.Generator().manual_seed(0)
    x_train = torch.randn(TRAIN // scale, s.input_dim, generator=gen).relu_()
    x_test = torch.randn(TEST // scale, s.input_dim, generator=gen).relu_()
    unlabelled = torch.randn(UNLABELLED // scale, s.input_dim, generator=gen).relu_()
    return (x_train, torch.arange(len(x_train)) % CLASSES, x_test, torch.arange(len(x_test)) % CLASSES,
            unlabelled)


def sgemm_rate(n: int = 2048) -> float:
    """FLOP/s of one n x n x n float32 matrix product on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, 1, 3)


def memcpy_bandwidth(mib: int = 256) -> float:
    """Bytes/s copied by one large float32 copy (each byte counted once), now."""
    src = torch.randn(mib * 2 ** 18)
    dst = torch.empty_like(src)
    return src.numel() * 4 / median_time(lambda: dst.copy_(src), 1, 5)


def timed(step) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def main() -> None:
    """Time each phase, extrapolate to the protocol, print the table against the floors and references."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="toy sizes for a quick smoke run")
    parser.add_argument("--npz", help="cached embeddings instead of synthetic ones (x_train y_train x_test y_test)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of one stage timed (scaled to 2000 x 5)")
    parser.add_argument("--key-inputs", type=int, default=16384, help="inputs of the timed key-learning epoch")
    parser.add_argument("--eval-inputs", type=int, default=2000, help="test inputs of the timed evaluation")
    parser.add_argument("--package", action="store_true", help="time the reference package at paper sizes too")
    parser.add_argument("--package-repeats", type=int, default=1, help="timed package steps (after 1 warm-up)")
    args = parser.parse_args()
    s = SMALL if args.small else PAPER
    # timings on a shared machine move with its load: say what it was
    print(use_threads(), f"| torch {torch.__version__} | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    t_load, (x_train, y_train, x_test, y_test, unlabelled) = timed(lambda: load(args, s))
    s = dataclasses.replace(s, input_dim=x_train.shape[1], value_dim=int(y_train.max()) + 1)
    print(f"D={s.input_dim} C={s.codebooks} K={s.keys} d_k={s.key_dim} d_v={s.value_dim} batch={s.batch}; "
          f"{len(x_train)} train, {len(x_test)} test, {len(unlabelled)} unlabelled inputs")
    classes = [[2 * i, 2 * i + 1] for i in range(s.value_dim // 2)]
    eval_rows = torch.arange(min(args.eval_inputs, len(x_test)))
    stream = make_stream(x_train, y_train, x_test[eval_rows], y_test[eval_rows], s.value_dim, classes)
    stage = stream[0]
    n_stages, n_train, n_test = len(stream), len(stage.y_train), len(x_test)  # protocol: a stage's / all test

    bottleneck = KeyValueBottleneck(s.input_dim, s.codebooks, s.keys, s.key_dim, s.value_dim, topk=1)
    m = min(args.key_inputs, len(unlabelled))
    with torch.no_grad():
        t_proj, z = timed(lambda: bottleneck.project(unlabelled[:m]))
    # warm-up: the compiled loops load and the search's thread pool starts at a process's first key learning,
    # a cost the extrapolation below would otherwise count once per --key-inputs inputs (31 times by default)
    learn_keys(z[: min(m, 1024)], s.keys, "ema", 1, 0.95, 1024)
    t_keys, keys = timed(lambda: learn_keys(z, s.keys, "ema", 1, 0.95, 1024))
    bottleneck.keys.copy_(keys)
    learner = paper_learner(s, bottleneck)

    t_lookup, idx = timed(lambda: learner.stage_inputs(stage.x_train))
    def config(epochs: int):
        return parse_run_config({"preset": "dkvb_paper_model", "data": {"validation": 0.0},
                                 "learner": {"name": "dkvb", "num_codebooks": s.codebooks, "num_keys": s.keys,
                                             "key_dim": s.key_dim},
                                 "train": {"epochs": epochs}})
    # The value step as it runs (compiled on the CPU, on cache-line rows: bottleneck.value_table) and, in turns,
    # the torch step that was the CPU's before it (usage counted deferred), on a learner of its own with the
    # contiguous table it was written for: the same epochs, so their ratio is measured under one load.
    torch_learner = paper_learner(s, bottleneck)
    torch_learner.bottleneck.values.data = torch_learner.bottleneck.values.data.contiguous()
    for one in (learner, torch_learner):
        one.stage_inputs = lambda x: idx  # timed above: train_stage reads the index cache from here
        one.begin_stage(stage)
    # Epochs in blocks, as a run has them (each after another epoch on the same table, so its rows are as
    # warm in the caches as in a run), the two steps' blocks in turns; each block starts with one untimed epoch.
    t_epochs = t_torch_epochs = 0.0
    for start in range(0, args.epochs, EPOCH_BLOCK):
        one, block = config(1), config(min(EPOCH_BLOCK, args.epochs - start))
        train_stage(learner, stage, one, n_stages)  # (the first: the compiled step compiled or loaded here)
        t_epochs += timed(lambda: train_stage(learner, stage, block, n_stages))[0]
        with torch_value_step():
            train_stage(torch_learner, stage, one, n_stages)
            t_torch_epochs += timed(lambda: train_stage(torch_learner, stage, block, n_stages))[0]
    del torch_learner
    learner.end_stage(stage, is_last=False)
    del learner.stage_inputs
    # as run_stream does: each test input's nearest candidate keys found once per run (learner.eval_inputs),
    # then every stage's evaluation answers its unused-key mask from them
    x_eval = torch.cat([st.x_test for st in stream])
    t_cand, eval_inputs = timed(lambda: learner.eval_inputs(x_eval))
    t_eval, _ = timed(lambda: evaluate(learner, stream, "test", config(1).train.eval_batch_size, inputs=eval_inputs))

    rate, bandwidth = sgemm_rate(), memcpy_bandwidth()
    proj_flop = 2 * s.input_dim * s.codebooks * s.key_dim  # per input
    score_flop = 2 * s.codebooks * s.keys * s.key_dim  # per input and pass over the keys
    n_unlabelled = len(unlabelled)
    epoch_bytes = 2 * n_train * s.codebooks * 1 * s.value_dim * 4  # top-1: one value row gathered + written
    steps = -(-n_train // s.batch) * EPOCHS_PER_STAGE * n_stages
    rows = [  # phase, what was timed, seconds timed, protocol seconds, floor seconds
        ("load", "all inputs, once", t_load, t_load, None),
        ("key learning", f"1 epoch on {m} inputs, x {n_unlabelled * KEY_EPOCHS / m:.0f}",
         t_proj + t_keys, t_proj * n_unlabelled / m + t_keys * n_unlabelled * KEY_EPOCHS / m,
         (proj_flop + score_flop * KEY_EPOCHS) * n_unlabelled / rate),
        ("lookup", f"1 stage ({n_train} inputs), x {n_stages}", t_lookup, t_lookup * n_stages,
         (proj_flop + score_flop) * n_train * n_stages / rate),
        ("epochs", f"{args.epochs} epochs of 1 stage, x {EPOCHS_PER_STAGE * n_stages // args.epochs}", t_epochs,
         t_epochs * EPOCHS_PER_STAGE * n_stages / args.epochs, epoch_bytes * EPOCHS_PER_STAGE * n_stages / bandwidth),
        ("candidates", f"{len(eval_rows)} test inputs once, x {n_test / len(eval_rows):.0f}", t_cand,
         t_cand * n_test / len(eval_rows), (proj_flop + score_flop) * n_test / rate),
        ("evaluation", f"{len(eval_rows)} test inputs, x {n_test * n_stages / len(eval_rows):.0f}", t_eval,
         t_eval * n_test * n_stages / len(eval_rows), None),
    ]
    total = sum(r[3] for r in rows)
    floor = sum(r[4] or 0 for r in rows)

    print(f"\nfloors: sgemm {rate / 1e9:.1f} GFLOP/s, memcpy {bandwidth / 1e9:.1f} GB/s (measured now); "
          f"epoch = {-(-n_train // s.batch)} steps of batch {s.batch}; the protocol = {steps} steps")
    head = f"{'phase':<13} {'timed':<34} {'s timed':>9} {'protocol s':>11} {'floor s':>9} {'x floor':>8}"
    print(head + "\n" + "-" * len(head))
    for phase, what, sec, full, low in rows:
        ratio = f"{full / low:>7.1f}x" if low else f"{'':>8}"
        low_s = f"{low:>9.2f}" if low is not None else f"{'-':>9}"
        print(f"{phase:<13} {what:<34} {sec:>9.3f} {full:>11.1f} {low_s} {ratio}")
    print(f"{'protocol':<13} {'sum of the phases':<34} {'':>9} {total:>11.1f} {floor:>9.2f} {total / floor:>7.1f}x")
    print(f"\nclorch: the full protocol in {total / 60:.1f} min (floor {floor / 60:.2f} min); one epoch "
          f"{t_epochs / args.epochs:.3f} s, against {t_torch_epochs / args.epochs:.3f} s with the torch step in "
          f"turns ({t_torch_epochs / t_epochs:.2f}x; its protocol "
          f"{(total + (t_torch_epochs - t_epochs) * EPOCHS_PER_STAGE * n_stages / args.epochs) / 60:.1f} min)")

    # References: the same protocol's steps through other implementations, per-step time x steps
    name = "reference package (discrete-key-value-bottleneck-pytorch)"
    if importlib.util.find_spec("discrete_key_value_bottleneck_pytorch") is None:
        print(f"{name}: not available (not installed; pip install -e .[bench])")
    elif not args.small and not args.package:
        print(f"{name}: skipped (at paper sizes it needs ~12 GB of RAM and ~10 s a step: pass --package)")
    else:
        package = build_package(s, x_train[: max(s.keys, s.batch)])
        params = [p for p in package.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=config(1).train.lr)
        x, y = x_train[: s.batch], y_train[: s.batch]
        step = median_time(lambda: autograd_step(lambda inp: package(inp.unsqueeze(1))[:, 0], params, opt, x, y),
                           1, args.package_repeats)
        ours = t_epochs * EPOCHS_PER_STAGE * n_stages / args.epochs
        print(f"{name}: {step:.3f} s a step, the protocol's epochs in {step * steps / 60:.1f} min "
              f"({step * steps / ours:.0f}x clorch's)")
    # The authors' module (key_value_bottleneck.core.KeyValueBottleneck, repository
    # ftraeuble/discrete_key_value_bottleneck) is installed from its git repository only, not from a package
    # index, so this offline machine has never had it to time; like the package, its forward builds the full
    # (C, B, K) distance tensor of every step, and with frozen keys a one-hot (C, B, K) count of the selections.
    print("official DKVB module (key_value_bottleneck, the authors' repository "
          "ftraeuble/discrete_key_value_bottleneck): not timed: it installs from git only, which this offline "
          "machine cannot reach")


if __name__ == "__main__":
    main()
