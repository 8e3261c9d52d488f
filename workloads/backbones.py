"""Frozen encoders in front of the learners: a registry of names, each with its input transform and exposed layer.

`build_backbone(cfg, input_shape)` is the one way to create them. A backbone maps transformed inputs (B, ...)
to embeddings (B, output_dim); `transform` turns a source's raw tensors (uint8 images or float vectors) into
what the backbone expects, and `describe_transform()` names that transform in a stable string (the feature
cache puts it in its keys). `layer` names the layer whose (pooled) output is the embedding.

Weights: `pretrained` fetches the library's own download (timm, open_clip, torch.hub); `checkpoint` reads a local
file in any of the official layouts (see `load_state`). Offline machines fail fast: weights already in the
library's local cache are used without touching the network; otherwise one short HTTP probe of the download
host decides, before the library (whose retries take ~45 s on a dead network) is ever asked to download.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from workloads.config import BackboneConfig, ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

SWAV_RN50W2_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_RN50w2_400ep_pretrain.pth.tar"
DINO_RN50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
PROBE_TIMEOUT_S = 3.0


class Backbone(nn.Module):
    """An encoder with its declared output dimension, exposed layer and input transform."""

    name: ClassVar[str] = ""
    layers: ClassVar[dict[str, int | None]] = {}  # accepted layer -> output dim (None: depends on the input)
    default_layer: ClassVar[str] = ""
    has_pretrained: ClassVar[bool] = False  # `pretrained: true` is accepted
    has_weights: ClassVar[bool] = True  # `checkpoint` is accepted

    output_dim: int
    layer: str

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw source tensor -> model input; uint8 images become floats in [0, 1]."""
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def describe_transform(self) -> str:
        """A stable, human-readable description of `transform` (part of the feature cache's keys)."""
        return "uint8 / 255, other dtypes as float32; no resize, no normalisation"

    def weights_module(self) -> nn.Module:
        """The module a checkpoint's official key layout refers to."""
        return self

    def remap_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backbone-specific key changes from an official layout to `weights_module()`'s (none by default)."""
        return state

    @classmethod
    def check_input(cls, input_shape: tuple[int, ...]) -> None:
        """Raise ConfigError if inputs of this shape (no batch dimension) cannot go through this backbone."""


class Identity(Backbone):
    """For vector data: the input, flattened, is the embedding."""

    name = "identity"
    layers = {"input": None}
    default_layer = "input"
    has_weights = False

    def __init__(self, input_shape: tuple[int, ...], layer: str = "input", pretrained: bool = False):
        super().__init__()
        self.layer = layer
        self.output_dim = int(torch.tensor(input_shape).prod())

    def describe_transform(self) -> str:
        return "uint8 / 255, other dtypes as float32; flattened"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class SmallCNN(Backbone):
    """A two-block CNN for image tests and fine-tuning on small images; random weights unless a checkpoint."""

    name = "small_cnn"
    layers = {"pool": 64}
    default_layer = "pool"

    def __init__(self, input_shape: tuple[int, ...], layer: str = "pool", pretrained: bool = False,
                 width: int = 32):
        super().__init__()
        channels = input_shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.layer = layer
        self.output_dim = 2 * width

    @classmethod
    def check_input(cls, input_shape: tuple[int, ...]) -> None:
        if len(input_shape) != 3:
            raise ConfigError(f"backbone.name: small_cnn needs images (C, H, W), the data gives {tuple(input_shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- image transforms ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side, centre-crop a square, normalise: the evaluation transform of a pretrained model."""

    size: int
    interpolation: str  # "bilinear" or "bicubic", as the model was trained
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        """The transform in words; every parameter that changes the pixels appears here."""
        clamp = ", clamped to [0, 1]" if self.interpolation == "bicubic" else ""
        return (f"RGB (1 channel repeated); uint8 / 255, floats taken as [0, 1]; shorter side resized to "
                f"{self.size} ({self.interpolation}, antialias{clamp}); centre crop {self.size}x{self.size}; "
                f"normalised mean {self.mean} std {self.std}")

    def __call__(self, x: torch.Tensor, backbone_name: str) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"backbone.name: {backbone_name} needs RGB or grey images (N, 3 or 1, H, W), "
                              f"the data gives {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:  # grey sources (digits): the pretrained stems expect three channels
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = nn.functional.interpolate(x, size=(new_h, new_w), mode=self.interpolation, antialias=True,
                                          align_corners=False)
            if self.interpolation == "bicubic":  # bicubic overshoots; PIL's uint8 pipeline would clip
                x = x.clamp(0.0, 1.0)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        # on the inputs' device: a GPU encoder transforms its batches there
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class ImageBackbone(Backbone):
    """A pretrained image encoder: rejects vector data, resizes and normalises as in its pretraining."""

    image_transform: ClassVar[ImageTransform]

    @classmethod
    def check_input(cls, input_shape: tuple[int, ...]) -> None:
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise ConfigError(f"backbone.name: {cls.name} needs RGB or grey images (3 or 1, H, W), "
                              f"the data gives {tuple(input_shape)}")

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images (N, C, H, W) -> resized, centre-cropped, normalised RGB floats."""
        return self.image_transform(x, self.name)

    def describe_transform(self) -> str:
        return self.image_transform.describe()


# --- ResNets -------------------------------------------------------------------------------------------------

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(ImageBackbone):
    """A ResNet trunk up to `layer` (layer1..layer4), globally average-pooled."""

    stem: ClassVar[tuple[str, ...]]  # the trunk's modules before layer1, in order

    model: nn.Module

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        self.output_dim = int(self.layers[layer])  # type: ignore[arg-type]
        self.depth = RESNET_LAYERS.index(layer) + 1  # later layers keep their weights but are never run

    def weights_module(self) -> nn.Module:
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stem + RESNET_LAYERS[:self.depth]:
            x = getattr(self.model, name)(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class TimmResNet50(ResNetBackbone):
    """ResNet-50 trained on ImageNet-1k (timm `resnet50.tv2_in1k`, the torchvision V2 weights), pooled layer4."""

    name = "resnet50_in1k"
    layers = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    default_layer = "layer4"
    has_pretrained = True
    stem = ("conv1", "bn1", "act1", "maxpool")
    # The torchvision V2 recipe evaluates at 224 with bilinear resizing.
    image_transform = ImageTransform(224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, input_shape: tuple[int, ...], layer: str = "layer4", pretrained: bool = False):
        super().__init__(layer)
        import timm

        def create(download: bool) -> nn.Module:
            return timm.create_model("resnet50.tv2_in1k", pretrained=download, num_classes=0)

        if pretrained:
            self.model = fetch_weights(self.name, "the Hugging Face Hub (timm/resnet50.tv2_in1k)",
                                       cached=lambda: with_hf_offline(lambda: _quietly("timm", create, True)),
                                       download=lambda: create(True), probe_url=hf_endpoint())
        else:
            self.model = create(False)


class TorchvisionResNet50(ResNetBackbone):
    """torchvision's ResNet-50 architecture (classifier removed); the DINO weights subclass it."""

    layers = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    stem = ("conv1", "bn1", "relu", "maxpool")

    def __init__(self, layer: str):
        super().__init__(layer)
        import torchvision

        self.model = torchvision.models.resnet50(weights=None)
        self.model.fc = nn.Identity()  # no classifier: official self-supervised checkpoints have none


class DinoResNet50(TorchvisionResNet50):
    """ResNet-50 self-supervised with DINO (Caron et al. 2021), pooled layer3 (1024-d) by default."""

    name = "dino_resnet50"
    default_layer = "layer3"
    has_pretrained = True
    # DINO's linear evaluation resizes with bicubic interpolation (torchvision interpolation=3).
    image_transform = ImageTransform(224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, input_shape: tuple[int, ...], layer: str = "layer3", pretrained: bool = False):
        state = torch_hub_weights(self.name, DINO_RN50_URL) if pretrained else None  # before building: fail fast
        super().__init__(layer)
        if state is not None:
            load_state(self, state, DINO_RN50_URL, "backbone.pretrained")


def _conv_init(module: nn.Module) -> None:
    """Random weights as SwAV initialises them (He normal, fan out), so random features stay well scaled."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class SwAVResNet50Trunk(nn.Module):
    """SwAV's ResNet-50 with every width multiplied by `widen`; parameter names as in SwAV's checkpoints.

    Follows facebookresearch/swav `src/resnet50.py` (current main, whose RN50-w2 has the paper's 94M
    parameters): a zero-padding layer (no parameters) then a 7x7 conv with padding 2 (together: torchvision's
    padding 3), a stem of 64 * widen channels, and bottlenecks of inner width 64 * widen * 2^i, so stage i+1
    outputs 256 * widen * 2^i channels: every width of ResNet-50 times `widen`.
    """

    def __init__(self, widen: int = 2, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        from torchvision.models.resnet import Bottleneck  # same block (and key names) as SwAV's

        width = 64 * widen
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, n in enumerate(blocks):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            out = planes * Bottleneck.expansion
            downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            # base_width stays 64 so that the inner width is `planes` (an early SwAV revision multiplied it
            # by widen once more; the released checkpoints do not).
            stage = [Bottleneck(inplanes, planes, stride, downsample)]
            stage += [Bottleneck(out, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = out
        _conv_init(self)


class SwAVResNet50W2(ResNetBackbone):
    """SwAV's ResNet-50 at twice the width (Caron et al. 2020), pooled layer3 (2048-d) by default."""

    name = "swav_resnet50w2"
    layers = {"layer1": 512, "layer2": 1024, "layer3": 2048, "layer4": 4096}
    default_layer = "layer3"
    has_pretrained = True
    stem = ("padding", "conv1", "bn1", "relu", "maxpool")
    # SwAV's linear evaluation resizes with torchvision's default, bilinear.
    image_transform = ImageTransform(224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, input_shape: tuple[int, ...], layer: str = "layer3", pretrained: bool = False):
        # The weights `torch.hub.load("facebookresearch/swav:main", "resnet50w2")` loads, fetched by URL
        # through torch.hub's cache so that no third-party hubconf code runs.
        state = torch_hub_weights(self.name, SWAV_RN50W2_URL) if pretrained else None
        super().__init__(layer)
        self.model = SwAVResNet50Trunk(widen=2)
        if state is not None:
            load_state(self, state, SWAV_RN50W2_URL, "backbone.pretrained")


# --- CLIP ----------------------------------------------------------------------------------------------------

class ClipViTB32(ImageBackbone):
    """OpenAI CLIP ViT-B/32 image tower (open_clip `ViT-B-32`, QuickGELU as trained by OpenAI)."""

    name = "clip_vit_b32"
    # image_embedding: the projected embedding that CLIP matches against text;
    # pre_projection: the class token after the final layer norm, before the projection.
    layers = {"image_embedding": 512, "pre_projection": 768}
    default_layer = "image_embedding"
    has_pretrained = True
    image_transform = ImageTransform(224, "bicubic", CLIP_MEAN, CLIP_STD)

    def __init__(self, input_shape: tuple[int, ...], layer: str = "image_embedding", pretrained: bool = False):
        super().__init__()
        path = self._download() if pretrained else None  # before building: fail fast
        import open_clip

        # The text tower is built too (the public constructor builds both) and dropped at once.
        # open_clip warns that the weights are random: expected, they are loaded next or wanted random.
        clip = _quietly("open_clip", open_clip.create_model, "ViT-B-32", force_quick_gelu=True)
        self.model = clip.visual
        self.layer = layer
        self.output_dim = int(self.layers[layer])  # type: ignore[arg-type]
        self._tokens: torch.Tensor | None = None
        if layer == "pre_projection":
            # open_clip's ViT pools the class token after ln_post; capturing ln_post's output keeps the model's
            # own forward (no private methods) and costs one 768x512 matmul.
            self.model.ln_post.register_forward_hook(self._capture)
        if path is not None:
            load_state(self, read_checkpoint(Path(path), "backbone.pretrained"), str(path), "backbone.pretrained")

    def _download(self) -> str:
        import open_clip

        cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
        return fetch_weights(self.name, f"the Hugging Face Hub ({cfg.get('hf_hub', '').rstrip('/')})",
                             cached=lambda: with_hf_offline(lambda: open_clip.download_pretrained(cfg)),
                             download=lambda: open_clip.download_pretrained(cfg), probe_url=hf_endpoint())

    def _capture(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._tokens = output

    def weights_module(self) -> nn.Module:
        return self.model

    def remap_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole-CLIP state dict (open_clip's or OpenAI's names) -> the image tower's keys."""
        if any(k.startswith("visual.") for k in state):
            return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.model(x)
        if self.layer == "pre_projection":
            tokens, self._tokens = self._tokens, None
            assert tokens is not None
            return tokens[:, 0]
        return embedding


BACKBONES: dict[str, type[Backbone]] = {
    cls.name: cls for cls in (Identity, SmallCNN, TimmResNet50, ClipViTB32, SwAVResNet50W2, DinoResNet50)}


def build_backbone(cfg: BackboneConfig, input_shape: tuple[int, ...]) -> Backbone:
    """The backbone a BackboneConfig names, for inputs of `input_shape` (without the batch dimension)."""
    if cfg.name not in BACKBONES:
        raise ConfigError(f"backbone.name: unknown backbone {cfg.name!r}; accepted: {', '.join(sorted(BACKBONES))}")
    cls = BACKBONES[cfg.name]
    cls.check_input(tuple(input_shape))
    layer = cfg.layer if cfg.layer is not None else cls.default_layer
    if layer not in cls.layers:
        raise ConfigError(f"backbone.layer: {cfg.name} has no layer {layer!r}; accepted: {', '.join(cls.layers)}")
    if cfg.pretrained and cfg.checkpoint:
        raise ConfigError("backbone.pretrained: set either backbone.pretrained: true (download) or "
                          "backbone.checkpoint: PATH (a local file), not both")
    if not cls.has_weights and (cfg.pretrained or cfg.checkpoint):
        key = "pretrained" if cfg.pretrained else "checkpoint"
        raise ConfigError(f"backbone.{key}: the {cfg.name} backbone has no weights to load")
    if cfg.pretrained and not cls.has_pretrained:
        with_weights = sorted(name for name, c in BACKBONES.items() if c.has_pretrained)
        raise ConfigError(f"backbone.pretrained: {cfg.name} has no pretrained weights; "
                          f"backbones that do: {', '.join(with_weights)}")
    path = None
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():  # checked before building: a typo should not cost a model's construction
            raise ConfigError(f"backbone.checkpoint: file {path} not found")
    backbone = cls(tuple(input_shape), layer, bool(cfg.pretrained))  # type: ignore[call-arg]
    if path is not None:
        load_state(backbone, read_checkpoint(path), str(path))
    return backbone


# --- checkpoints ---------------------------------------------------------------------------------------------

# Official checkpoints nest the weights under one of these (DINO full checkpoints hold both networks; the
# teacher is the one DINO releases and evaluates, so it wins).
NESTED_KEYS = ("teacher", "state_dict", "model", "student")
# Wrappers: DistributedDataParallel (`module.`) and DINO's MultiCropWrapper (`backbone.`).
WRAPPER_PREFIXES = ("module.", "backbone.")
# Heads trained on top of the encoder: classifiers, DINO heads, SwAV projection heads and prototypes.
HEAD_PREFIXES = ("fc.", "head.", "projection_head.", "prototypes.")


def read_checkpoint(path: Path, key: str = "backbone.checkpoint") -> Any:
    """The object in a local weights file: `.safetensors` via safetensors, else torch.load(weights_only=True)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # DINO's full checkpoints carry their argparse options; a Namespace holds plain values only.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, a pickle of arbitrary objects, a TorchScript archive...
        raise ConfigError(f"{key}: could not read {path} as a state dict: {_one_line(e)}") from e


def official_state(obj: Any, key: str = "backbone.checkpoint") -> dict[str, torch.Tensor]:
    """The encoder's tensors from a checkpoint object: nesting unwrapped, `module.`/`backbone.` stripped."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key}: no state dict found; expected a mapping of tensors, or one nested under "
                          f"{', '.join(NESTED_KEYS)}")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        state[name] = value
    return state


def load_state(backbone: Backbone, obj: Any, source: str, key: str = "backbone.checkpoint") -> None:
    """Load a checkpoint object into `backbone.weights_module()`, remapping the official layouts.

    Raises ConfigError naming (a few of) the missing, unexpected and wrongly shaped keys when it does not fit.
    """
    module = backbone.weights_module()
    target = module.state_dict()
    state = backbone.remap_state(official_state(obj, key))
    if state and all(k.startswith("model.") for k in state) and not any(k.startswith("model.") for k in target):
        state = {k[len("model."):]: v for k, v in state.items()}  # a clorch backbone's own state_dict()
    state = {k: v for k, v in state.items() if k in target or not k.startswith(HEAD_PREFIXES)}
    # BatchNorm's step counter does not change any output, and checkpoints from before PyTorch 0.4.1 lack it.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in state
             if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("keys of the wrong shape", wrong))
                 if keys]
        raise ConfigError(f"{key}: {source} does not fit {backbone.name} (after stripping "
                          f"module./backbone. prefixes and heads): {'; '.join(parts)}")
    module.load_state_dict(state, strict=False)
    log.info("loaded %s weights from %s", backbone.name, source)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


# --- downloads that fail fast --------------------------------------------------------------------------------

def hf_endpoint() -> str:
    """The Hugging Face Hub endpoint the libraries download from (HF_ENDPOINT honoured)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if one HEAD request to `url` gets any HTTP answer within `timeout` seconds (proxies honoured)."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:  # the server answered (403, 404...): the network is there
            answered.append(True)
        except Exception:  # no DNS, refused, timed out, proxy refused the tunnel
            answered.append(False)

    # A thread bounds the whole probe, DNS resolution included (urlopen's timeout does not cover it).
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def offline_requested() -> bool:
    """HF_HUB_OFFLINE=1 (the Hugging Face convention) means: never touch the network, for every source."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def with_hf_offline(fn: Callable[[], T]) -> T:
    """Run `fn` with huggingface_hub in offline mode: cached files only, no request, no retries."""
    from huggingface_hub import constants

    # huggingface_hub reads constants.HF_HUB_OFFLINE at each request, so flipping it here is enough.
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        return fn()
    finally:
        constants.HF_HUB_OFFLINE = old


def fetch_weights(name: str, where: str, cached: Callable[[], T], download: Callable[[], T], probe_url: str) -> T:
    """The library's weights: from its local cache if there, else downloaded if the host answers a short probe.

    Any failure is one line of ConfigError naming backbone.pretrained and the backbone.checkpoint way out.
    """
    try:
        return cached()
    except Exception:  # not in the cache (or unreadable there): a download is needed
        pass
    if offline_requested():
        reason = "HF_HUB_OFFLINE is set"
    elif not reachable(probe_url):
        reason = f"{urllib.parse.urlsplit(probe_url).netloc or probe_url} is unreachable"
    else:
        try:
            return download()
        except Exception as e:
            reason = _one_line(e)
    raise ConfigError(f"backbone.pretrained: could not download the {name} weights from {where} ({reason}); "
                      "download them where there is a network, then set backbone.pretrained: false and "
                      "backbone.checkpoint: PATH instead")


def torch_hub_weights(name: str, url: str) -> Any:
    """A checkpoint object through torch.hub's download and cache (<hub dir>/checkpoints), failing fast."""
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(url).path).name

    def load() -> Any:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)

    def cached() -> Any:
        if not cache_file.is_file():
            raise FileNotFoundError(cache_file)
        return load()  # torch.hub serves its cached copy without a request

    return fetch_weights(name, url, cached=cached, download=load, probe_url=url)


def _quietly(package: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) with `package`'s info and warnings dropped: messages about situations expected here."""
    marker = f"{os.sep}{package}{os.sep}"

    def keep(record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and marker in record.pathname)

    # Libraries log through their own loggers (timm) or straight through the root logger (open_clip).
    logger, root = logging.getLogger(package), logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    root.addFilter(keep)
    try:
        return fn(*args, **kwargs)
    finally:
        root.removeFilter(keep)
        logger.setLevel(level)
