"""N bottleneck configs on one data set through a frozen CNN, with and without the feature cache.

Without the cache every config encodes the data itself (each gets an empty cache folder); with it the first
config encodes and the rest read the memory-mapped embeddings. The table gives, for each N, the total time
and the time spent encoding in both modes, and the ratio. The data are synthetic images written in the real
CIFAR-10 python-pickle format; the CNN is clorch's `small_cnn` with fixed random weights.

    python bench/feature_cache.py                 # N = 1, 4, 8; 5000 train + 1000 test images
    python bench/feature_cache.py --n 2 --images 1000
"""
from __future__ import annotations

import argparse
import logging
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from workloads.config import parse_run_config
from workloads.runner import prepare, run_stream


def write_cifar(root: Path, train: int, test: int) -> None:
    """Random images with random labels in CIFAR-10's python-pickle layout (5 train batches + test batch)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (base / name).write_bytes(pickle.dumps(batch))


def configs(root: Path, cache_dir: Path, n: int, shared: bool) -> list:
    """n DKVB configs that share data and backbone and differ in the bottleneck."""
    out = []
    for i in range(n):
        out.append(parse_run_config({
            "seed": 0, "cache_dir": str(cache_dir if shared else cache_dir / f"own-{i}"),
            "data": {"source": "cifar10", "root": str(root), "classes_per_stage": 2},
            "backbone": {"name": "small_cnn"},
            "learner": {"name": "dkvb", "num_codebooks": 16, "num_keys": 32 * (1 + i % 4), "key_dim": 4,
                        "key_init": "random"},
            "train": {"epochs": 1, "lr": 0.1 * (1 + i)},
        }))
    return out


def run_all(cfgs: list) -> tuple[float, float, int]:
    """Total seconds, seconds spent encoding, and inputs encoded over all configs."""
    started, encode_s, encoded = time.perf_counter(), 0.0, 0
    for config in cfgs:
        prepared = prepare(config)
        run_stream(config, prepared=prepared)
        encode_s += prepared.context.features.encode_seconds
        encoded += prepared.context.features.encoded
    return time.perf_counter() - started, encode_s, encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 8], help="numbers of configs")
    parser.add_argument("--images", type=int, default=5000, help="training images (test: a fifth of that)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_cifar(root, args.images, args.images // 5)
        print(f"{args.images} + {args.images // 5} images (3x32x32) through small_cnn; DKVB configs differ in "
              "keys and learning rate")
        run_all(configs(root, Path(tmp) / "warm-up", 1, shared=True))  # imports and first-call costs, untimed
        print(f"\n{'N':>3}  {'no cache: total s':>17} {'encode s':>9}  {'cache: total s':>14} {'encode s':>9}  "
              f"{'encoded':>8}  {'speedup':>7}")
        for n in args.n:
            cold_total, cold_enc, _ = run_all(configs(root, Path(tmp) / f"cold-{n}", n, shared=False))
            warm_total, warm_enc, encoded = run_all(configs(root, Path(tmp) / f"shared-{n}", n, shared=True))
            print(f"{n:>3}  {cold_total:>17.2f} {cold_enc:>9.2f}  {warm_total:>14.2f} {warm_enc:>9.2f}  "
                  f"{encoded:>8}  {cold_total / warm_total:>6.1f}x")
        print("\n'encoded' counts the inputs the cached mode encoded: the same for every N (once per split).")


if __name__ == "__main__":
    main()
