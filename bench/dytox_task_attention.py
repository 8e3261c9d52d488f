"""DyTox's task-attention block: all T task tokens in one pass against the paper's one pass per token.

Every task token attends to the same patch tokens, so clorch normalises and projects the patches once and
scores all T queries against them together (`TaskAttentionBlock.forward`). The reference is the definition
run literally, T times: z_i = [token_i, patches] through the block (`one_token_at_a_time`). Both give the
same output (tests/test_dytox.py). The table times forward + backward at the paper's CIFAR-100 size
(dimension 384, 12 heads, 64 patches of 4x4 pixels) for T tokens, i.e. after T stages.

    python bench/dytox_task_attention.py                 # batch 32, T = 1, 10, 20, 50
    python bench/dytox_task_attention.py --batch 128 --tokens 10 50
"""
from __future__ import annotations

import argparse

import torch
from timing import median_time  # bench/timing.py (scripts run from bench/)

from workloads.learners.dytox import TaskAttentionBlock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 10, 20, 50])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    tab = TaskAttentionBlock(384, 12, 4.0)
    patches = torch.randn(args.batch, 64, 384, requires_grad=True)
    print(f"task attention, D 384, 12 heads, 64 patches, batch {args.batch}, forward + backward, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'T':>4}  {'per token (paper) s':>20}  {'one pass (clorch) s':>20}  {'speedup':>8}")
    for T in args.tokens:
        tokens = torch.randn(T, 384, requires_grad=True)

        def step(forward):
            return lambda: forward(tokens, patches).sum().backward()

        reference = median_time(step(tab.one_token_at_a_time), 1, args.repeats)
        ours = median_time(step(tab), 1, args.repeats)
        print(f"{T:>4}  {reference:>20.4f}  {ours:>20.4f}  {reference / ours:>7.1f}x")


if __name__ == "__main__":
    main()
