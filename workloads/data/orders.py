"""Class orders from the literature, by name, for `data.class_order`.

Papers fix the order in which classes arrive so that results can be compared run for run; a named order here
is the exact list a paper's code ships, not a regenerated shuffle.
"""
from __future__ import annotations

CLASS_ORDERS: dict[str, list[int]] = {
    # CIFAR-100 "order 1" of iCaRL's code as adopted by PODNet, DER and DyTox (PODNet's
    # options/data/cifar100_3orders.yaml, first order; DER's dataset.py, trial 2). It is not
    # numpy's permutation under seed 1993, which gives DER's trial 1, so it is kept as a list.
    "cifar100_order1": [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18,
                        24, 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59,
                        25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21,
                        60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7,
                        34, 55, 54, 26, 35, 39],
}

# `class_order: seed`: the natural order shuffled with the run's own `seed`, so that every seed of a sweep
# gets its own random class split (the DKVB paper's CIFAR-10 protocol: 5 seeds, 5 random splits).
SEEDED_ORDER = "seed"
