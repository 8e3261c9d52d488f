"""Backbones: declared dims and layers, transforms, checkpoints in the official layouts, offline failures."""
from __future__ import annotations

import argparse
import functools
import time

import pytest
import torch

from workloads import backbones
from workloads.backbones import BACKBONES, Backbone, build_backbone
from workloads.config import BackboneConfig, ConfigError

IMAGES = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
IMAGE_BACKBONES = ["resnet50_in1k", "clip_vit_b32", "swav_resnet50w2", "dino_resnet50"]


def make(name: str, seed: int = 0, shape: tuple[int, ...] = (3, 32, 32), **cfg) -> Backbone:
    """A backbone built from a config as a user writes it, with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return build_backbone(BackboneConfig(name=name, **cfg), shape).eval()


@functools.cache
def cached(name: str, layer: str | None = None) -> Backbone:
    """One random-weight (seed 0) backbone per name and layer for the whole file: building the big ones is slow."""
    return make(name, layer=layer)


@pytest.fixture(autouse=True, scope="module")
def _free_cached_backbones():
    yield
    cached.cache_clear()  # about 1 GB of weights: not for the rest of the suite to carry


@torch.no_grad()
def features(backbone: Backbone, x: torch.Tensor = IMAGES) -> torch.Tensor:
    return backbone(backbone.transform(x))


@pytest.mark.parametrize("name, layer, dim", [
    ("identity", None, 3 * 32 * 32), ("small_cnn", None, 64),
    ("resnet50_in1k", None, 2048), ("resnet50_in1k", "layer3", 1024),
    ("clip_vit_b32", None, 512), ("clip_vit_b32", "pre_projection", 768),
    ("swav_resnet50w2", None, 2048), ("swav_resnet50w2", "layer2", 1024),
    ("dino_resnet50", None, 1024), ("dino_resnet50", "layer4", 2048),
])
def test_each_backbone_gives_its_declared_dim_through_its_transform(name, layer, dim):
    backbone = cached(name, layer)
    assert backbone.layer == (layer or BACKBONES[name].default_layer)
    assert backbone.output_dim == dim
    assert BACKBONES[name].layers[backbone.layer] in (dim, None)  # None: identity's dim is the input's
    out = features(backbone)
    assert out.shape == (2, dim) and torch.isfinite(out).all()
    if name in IMAGE_BACKBONES:
        assert backbone.transform(IMAGES).shape == (2, 3, 224, 224)


def test_transforms_follow_each_models_pretraining_and_describe_themselves():
    clip, in1k, dino = cached("clip_vit_b32"), cached("resnet50_in1k"), cached("dino_resnet50")
    assert "bicubic" in clip.describe_transform() and "0.48145466" in clip.describe_transform()
    assert "bilinear" in in1k.describe_transform() and "0.485" in in1k.describe_transform()
    assert "bicubic" in dino.describe_transform() and "224" in dino.describe_transform()
    # Stable: the feature cache keys on this string, so a rebuilt backbone must give the same one.
    assert make("dino_resnet50", seed=3).describe_transform() == dino.describe_transform()
    assert cached("identity").layer == "input"
    # Grey [0, 1] float images (digits) become three normalised channels; uint8 and float agree.
    grey = torch.rand(2, 1, 8, 8)
    x = dino.transform(grey)
    assert x.shape == (2, 3, 224, 224)
    assert torch.allclose(x[:, 0] * 0.229 + 0.485, x[:, 2] * 0.225 + 0.406, atol=1e-6)
    assert torch.allclose(in1k.transform(IMAGES), in1k.transform(IMAGES.float() / 255), atol=1e-6)


@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_image_backbones_reject_vector_data_naming_the_shape(name):
    with pytest.raises(ConfigError, match=rf"backbone\.name: {name} needs .*images.*\(64,\)"):
        build_backbone(BackboneConfig(name=name), (64,))


def test_image_transform_rejects_vectors_at_run_time():
    with pytest.raises(ConfigError, match=r"backbone\.name: dino_resnet50 needs .*\(5, 64\)"):
        cached("dino_resnet50").transform(torch.rand(5, 64))


@pytest.mark.parametrize("cfg, message", [
    ({"name": "resnet50_in1k", "layer": "layer5"},
     r"backbone\.layer: resnet50_in1k has no layer 'layer5'; accepted: layer1, layer2, layer3, layer4"),
    ({"name": "clip_vit_b32", "layer": "layer4"}, r"accepted: image_embedding, pre_projection"),
    ({"name": "identity", "layer": "pool"}, r"backbone\.layer: identity has no layer 'pool'; accepted: input"),
    ({"name": "dino_resnet50", "pretrained": True, "checkpoint": "x.pth"}, r"backbone\.pretrained: .*not both"),
    ({"name": "identity", "pretrained": True}, r"backbone\.pretrained: the identity backbone has no weights"),
    ({"name": "identity", "checkpoint": "x.pth"}, r"backbone\.checkpoint: the identity backbone has no weights"),
    ({"name": "small_cnn", "pretrained": True}, r"backbone\.pretrained: small_cnn has no pretrained weights"),
    ({"name": "dino_resnet50", "checkpoint": "/nowhere/dino.pth"}, r"backbone\.checkpoint: file /nowhere/dino.pth "
                                                                   r"not found"),
])
def test_config_mistakes_are_one_line_errors(cfg, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_backbone(BackboneConfig(**cfg), (3, 32, 32))
    assert "\n" not in str(err.value)


def assert_loads_exactly(src: Backbone, path, name: str, layer: str | None = None) -> None:
    """The backbone rebuilt from the file (other random init first) gives exactly src's features."""
    dst = make(name, seed=1, checkpoint=str(path), layer=layer)
    assert torch.equal(features(dst), features(src))


def test_resnet50_in1k_loads_a_plain_safetensors_file_with_its_classifier(tmp_path):
    from safetensors.torch import save_file

    src = cached("resnet50_in1k")
    state = {**src.model.state_dict(), "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)}
    save_file(state, tmp_path / "resnet50.safetensors")
    assert_loads_exactly(src, tmp_path / "resnet50.safetensors", "resnet50_in1k")


def test_dino_loads_a_full_checkpoint_teacher_with_wrapper_prefixes_and_head(tmp_path):
    src = cached("dino_resnet50")
    teacher = {f"module.backbone.{k}": v for k, v in src.model.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(16, 2048)
    teacher["module.head.last_layer.weight_g"] = torch.ones(1, 16)
    student = {k: torch.randn_like(v.float()) for k, v in teacher.items()}  # must not be the one picked
    full = {"teacher": teacher, "student": student, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 60000)},
            "args": argparse.Namespace(arch="resnet50", lr=0.3, out_dim=60000)}
    torch.save(full, tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth")
    assert_loads_exactly(src, tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth", "dino_resnet50")
    # A clorch backbone's own state_dict and torchvision's plain layout load too.
    torch.save(src.state_dict(), tmp_path / "own.pt")
    assert_loads_exactly(src, tmp_path / "own.pt", "dino_resnet50")


@pytest.mark.slow
def test_swav_loads_its_official_layout_with_projection_head_and_prototypes(tmp_path):
    src = cached("swav_resnet50w2")
    state = {f"module.{k}": v for k, v in src.model.state_dict().items()}
    state.update({"module.projection_head.0.weight": torch.randn(32, 4096), "module.projection_head.1.weight":
                  torch.ones(32), "module.projection_head.3.weight": torch.randn(8, 32),
                  "module.prototypes.weight": torch.randn(30, 8)})
    torch.save(state, tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar")
    assert_loads_exactly(src, tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar", "swav_resnet50w2")


def test_swav_trunk_has_the_official_key_names_and_widths():
    state = cached("swav_resnet50w2").model.state_dict()
    assert state["conv1.weight"].shape == (128, 3, 7, 7)
    assert state["layer1.0.conv1.weight"].shape == (128, 128, 1, 1)  # inner width 64 * 2, not 64 * 2 * 2
    assert state["layer4.2.conv3.weight"].shape == (4096, 1024, 1, 1)
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 93_907_072


@pytest.mark.slow
def test_clip_loads_an_open_clip_state_dict_and_matches_its_encode_image(tmp_path):
    import open_clip

    torch.manual_seed(2)
    clip = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval()
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    dst = make("clip_vit_b32", seed=1, checkpoint=str(tmp_path / "open_clip_pytorch_model.bin"))
    with torch.no_grad():
        assert torch.equal(features(dst), clip.encode_image(dst.transform(IMAGES)))
    pre = make("clip_vit_b32", seed=1, checkpoint=str(tmp_path / "open_clip_pytorch_model.bin"),
               layer="pre_projection")
    assert torch.allclose(features(pre) @ clip.visual.proj, features(dst), atol=1e-5)


def test_a_checkpoint_that_does_not_fit_names_missing_unexpected_and_misshapen_keys(tmp_path):
    state = dict(cached("dino_resnet50").model.state_dict())
    del state["layer4.2.bn3.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError) as err:
        make("dino_resnet50", checkpoint=str(tmp_path / "bad.pth"))
    message = str(err.value)
    assert message.startswith("backbone.checkpoint: ") and "\n" not in message
    assert "1 missing keys (layer4.2.bn3.weight)" in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "conv1.weight (8, 3, 7, 7) vs (64, 3, 7, 7)" in message


def test_a_checkpoint_of_another_model_lists_a_few_keys(tmp_path):
    torch.save(cached("small_cnn").state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(ConfigError, match=r"missing keys \(conv1\.weight, bn1\.weight, .*\.\.\.\); "
                                          r"4 unexpected keys \(net\.0\.weight"):
        make("dino_resnet50", checkpoint=str(tmp_path / "cnn.pt"))


def test_an_unreadable_checkpoint_is_a_config_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"backbone\.checkpoint: could not read .*junk\.pth"):
        make("dino_resnet50", checkpoint=str(tmp_path / "junk.pth"))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights cached anywhere: torch.hub's and the Hugging Face Hub's caches point at empty folders."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def assert_fails_fast_in_one_line(name: str, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as err:
        make(name, pretrained=True)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith("backbone.pretrained: could not download") and "\n" not in message
    assert "backbone.checkpoint: PATH" in message


@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_pretrained_without_a_network_fails_fast_in_one_line(name, empty_caches, monkeypatch):
    monkeypatch.setattr(backbones, "reachable", lambda url, timeout=backbones.PROBE_TIMEOUT_S: False)
    assert_fails_fast_in_one_line(name, r"is unreachable")


def test_pretrained_on_this_machine_fails_fast_when_it_is_offline(empty_caches):
    if backbones.reachable(backbones.hf_endpoint()):
        pytest.skip("this machine reaches the Hugging Face Hub")
    assert_fails_fast_in_one_line("resnet50_in1k", r"huggingface\.co is unreachable")


def test_hf_hub_offline_is_honoured_for_every_source(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "reachable", lambda *a, **k: pytest.fail("no probe when offline is requested"))
    assert_fails_fast_in_one_line("dino_resnet50", r"HF_HUB_OFFLINE is set")


def test_pretrained_uses_torch_hubs_cached_copy_without_the_network(empty_caches, monkeypatch):
    monkeypatch.setattr(backbones, "reachable", lambda *a, **k: pytest.fail("a cached copy needs no probe"))
    src = cached("dino_resnet50")
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(src.model.state_dict(), cache / "dino_resnet50_pretrain.pth")  # the official plain layout
    assert torch.equal(features(make("dino_resnet50", seed=1, pretrained=True)), features(src))
