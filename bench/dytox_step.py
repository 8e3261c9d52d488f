"""Images per second of one DyTox training step (the dytox_cifar100_10 model, first stage: forward, BCE loss,
backward, AdamW update) on this machine's device, the training recipe's path against plain fp32 eager.

  fp32 eager   the reference: float32, contiguous batches, model as built
  recipe       what train.precision: auto gives here (bf16 autocast on a CUDA GPU with bf16, fp32 on a CPU),
               with channels-last batches and model on CUDA (workloads.transforms.to_device / autocast)

plus, on its own line, the per-batch augmentation alone (workloads.transforms.Augment, DyTox's CIFAR recipe
through timm and PIL on the CPU) in images per second: the step's input side. Random 3x32x32 images, both steps
timed in turns (bench/timing.alternating_median_times) on two copies of one model.

    python bench/dytox_step.py                 # CPU: 3 timed steps of batch 128; CUDA: 30
    python bench/dytox_step.py --steps 50 --batch 256
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from timing import alternating_median_times  # bench/timing.py (scripts run from bench/)

from workloads.config import AugmentConfig, parse_run_config
from workloads.data.streams import Stage
from workloads.learners import LearnerContext, build_learner
from workloads.transforms import Augment, autocast, resolve_precision, to_device


def main() -> None:
    """Print the table: path, precision, images per second, ratio to fp32 eager."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--steps", type=int, default=30 if cuda else 3)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = parse_run_config({"preset": "dytox_cifar100_10"})
    ctx = LearnerContext(num_classes=100, input_dim=3 * 32 * 32, train=config.train, seed=0, device=device,
                         input_shape=(3, 32, 32))
    plain = build_learner(config.learner, ctx).to(device)
    plain.begin_stage(Stage(0, tuple(range(10)), *[torch.empty(0)] * 4))
    recipe = copy.deepcopy(plain)
    recipe.optimizer = recipe.make_optimizer()  # its own, over its own parameters
    if cuda:
        recipe.to(memory_format=torch.channels_last)
    precision = resolve_precision("auto", device, images=True)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,), device=device)
    x_plain = x.to(device)

    def recipe_step():
        with autocast(precision, device):
            recipe.observe(to_device(x, device), y)  # float(loss) inside: the step has finished on the device

    times = alternating_median_times({"fp32": lambda: plain.observe(x_plain, y), "recipe": recipe_step},
                                     warmup=1, repeats=args.steps)
    augment = Augment(AugmentConfig(), (3, 32, 32))
    started = time.perf_counter()
    for i in range(max(1, args.steps // 3)):
        augment(x, i)
    augment_rate = max(1, args.steps // 3) * args.batch / (time.perf_counter() - started)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"DyTox step (dytox_cifar100_10 model, stage 1), batch {args.batch}, on {name}, median of {args.steps}")
    print(f"{'path':<12} {'precision':<10} {'channels-last':<14} {'images/s':>10} {'vs fp32':>8}")
    fp32 = args.batch / times["fp32"]
    rate = args.batch / times["recipe"]
    print(f"{'fp32 eager':<12} {'fp32':<10} {'no':<14} {fp32:>10.1f} {1.0:>7.2f}x")
    print(f"{'recipe':<12} {precision:<10} {'yes' if cuda else 'no':<14} {rate:>10.1f} {rate / fp32:>7.2f}x")
    print(f"augmentation alone (timm RandAugment via PIL, CPU): {augment_rate:.0f} images/s")


if __name__ == "__main__":
    main()
