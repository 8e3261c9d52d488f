"""Images per second of encoding through a real-size ResNet-50 (timm `resnet50.tv2_in1k` architecture, random
weights: no download), in float32 and under bf16 autocast, on this machine's device (CUDA if present).

Both columns run clorch's own encoder (workloads.features.encode_with_progress: on a GPU, pinned non-blocking
copies of the raw uint8 batches and the resize to 224 on the device). The reference is float32 on the same
device in the same run; the ratio is bf16 / fp32 throughput. CPUs are slow at this: keep --batches small.

    python bench/encode_throughput.py                      # CPU: 2 batches of 32; GPU: 20 batches of 256
    python bench/encode_throughput.py --batches 50 --batch-size 512
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from workloads.backbones import TimmResNet50
from workloads.features import encode_precision, encode_with_progress


def throughput(backbone, x: torch.Tensor, device: torch.device, batch_size: int, precision: str) -> float:
    """Images per second of one encoding pass over `x` (after one untimed warm-up batch)."""
    encode_with_progress(backbone, x[:batch_size], device, "warm-up", batch_size, precision)
    started = time.perf_counter()
    encode_with_progress(backbone, x, device, precision, batch_size, precision)
    return len(x) / (time.perf_counter() - started)


def main() -> None:
    """Print the table: device, precision, images per second, ratio to fp32."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--batches", type=int, default=20 if cuda else 2)
    parser.add_argument("--batch-size", type=int, default=256 if cuda else 32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    backbone = TimmResNet50((3, 32, 32)).requires_grad_(False)
    # CIFAR-sized uint8 images, resized to 224 by the backbone's transform, as a real sweep's would be
    x = torch.randint(0, 256, (args.batches * args.batch_size, 3, 32, 32), dtype=torch.uint8)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    bf16_note = " (no bf16 support: emulated)" if cuda and not torch.cuda.is_bf16_supported() else ""
    print(f"ResNet-50 encoding, {len(x)} images in batches of {args.batch_size}, on {name}{bf16_note}; "
          f"clorch's default here: {encode_precision(device)}")
    fp32 = throughput(backbone, x, device, args.batch_size, "fp32")
    bf16 = throughput(backbone, x, device, args.batch_size, "bf16")
    print(f"{'precision':<10} {'images/s':>10} {'vs fp32':>8}")
    print(f"{'fp32':<10} {fp32:>10.1f} {1.0:>7.2f}x")
    print(f"{'bf16':<10} {bf16:>10.1f} {bf16 / fp32:>7.2f}x")


if __name__ == "__main__":
    main()
