"""How large one DKVB trial's MLflow artifacts are at the paper's size, for each `tracking:` setting.

The codebook files are written by clorch's own tracking code (MLflowTracking.log_codebooks) into a real MLflow
store in a temporary folder, and the final model by orchestrator.models.save_model's weights format
(safetensors of the learner's tensors); sizes are read back from disk. The bottleneck is the paper's
(C = 256 codebooks, K = 4096 keys, d_k = 14, ResNet-50 embeddings of 2048 dimensions) with every value and usage
count filled at random: after a stage on CIFAR's 50 000 inputs nearly every key has been fetched, and random
values do not compress, so the figures are upper bounds. The reference is the old setting (float32 codebooks
after every stage), measured in the same run.

    python bench/artifact_size.py [--stages 5 10] [--classes 10 100]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

SETTINGS = [  # (name, tracking options); the first is the reference
    ("float32, every stage (reference)", {"codebooks": True, "codebook_precision": "float32"}),
    ("float16, every stage (default)", {"codebooks": True}),
    ("float16, every 5th stage and the last", {"codebooks": 5}),
    ("codebooks off", {"codebooks": False}),
]


def paper_bottleneck(classes: int):
    from workloads.bottleneck import KeyValueBottleneck

    gen = torch.Generator().manual_seed(0)
    b = KeyValueBottleneck(2048, 256, 4096, 14, classes)
    with torch.no_grad():
        b.values.copy_(torch.randn(b.values.shape, generator=gen))
        b.usage.copy_(torch.randint(1, 200, b.usage.shape, generator=gen))
    return b


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def codebook_mb(options: dict, model: dict, stages: int) -> float:
    """MB that MLflowTracking logs as codebooks over a stream of `stages` stages with these options."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import MLflowTracking, parse_tracking

    with tempfile.TemporaryDirectory() as root:
        client = MlflowClient(f"sqlite:///{root}/mlflow.db")
        exp = client.create_experiment("size", artifact_location=f"{root}/artifacts")
        run = client.create_run(exp).info.run_id
        tracking = MLflowTracking(f"sqlite:///{root}/mlflow.db", "size", root, parse_tracking(options))
        logged = [s for s in range(stages) if tracking.options.codebooks_after(s, stages)]
        for stage in logged:
            tracking.log_codebooks(run, stage, model, client, with_keys=stage == logged[0])
        return folder_mb(Path(root) / "artifacts")


def model_mb(bottleneck) -> float:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as root:
        save_file({k: v.contiguous() for k, v in bottleneck.state_dict().items()}, f"{root}/model.safetensors")
        return folder_mb(Path(root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up lines, between the table's rows
    print("| classes (d_v) | stages | setting | codebooks MB | + model MB | trial MB | vs reference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for classes in args.classes:
        bottleneck = paper_bottleneck(classes)
        model = {f"bottleneck.{k}": v for k, v in bottleneck.state_dict().items()}
        weights = model_mb(bottleneck)
        for stages in args.stages:
            reference = None
            for name, options in SETTINGS:
                total = codebook_mb(options, model, stages) + weights
                reference = reference or total
                print(f"| {classes} | {stages} | {name} | {total - weights:.1f} | {weights:.1f} | {total:.1f} "
                      f"| {total / reference:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
