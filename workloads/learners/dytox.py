"""DyTox (Douillard et al., CVPR 2022): a vision transformer that grows one task token per stage.

Patches -> L self-attention blocks (shared) -> one task-attention block (shared), run once per task token
-> one classifier per stage over that stage's classes, sigmoid + binary cross-entropy. While stage t trains:
distillation from a frozen copy of the model after stage t-1 (weight alpha = old classes / seen classes),
a divergence head on the newest embedding (the stage's classes + one "old" class, weight lambda, dropped at
test time), old tokens and classifiers frozen. After each stage from the second on: a balanced fine-tuning
phase on the rehearsal memory with the self-attention blocks frozen. `mixup: true` gives DyTox+.

The defaults follow the official code (github.com/arthurdouillard/dytox: continual/convit.py, dytox.py, engine.py,
main.py): GPSA self-attention blocks (ConViT), stochastic depth rising linearly over the blocks, a fresh task
token per stage, distillation averaged over batch x old classes, MixUp with label smoothing in training and
fine-tuning alike. Each deviation the project had before is an option.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.convit import Block as ConViTBlock
from torch import nn

from workloads.config import ConfigError
from workloads.data.streams import stage_seed
from workloads.distributed import gather, shard_batches, sum_across, world
from workloads.learners.base import Learner
from workloads import transforms

log = logging.getLogger(__name__)


@dataclass
class DyToxOptions:
    """Options of DyTox; the presets dytox_cifar100_{10,20,50} set the paper's model, dytox_tiny a toy one."""

    name: Literal["dytox"] = "dytox"
    embed_dim: int = 384  # D, of every token
    depth: int = 5  # self-attention blocks; one task-attention block follows
    heads: int = 12
    patch_size: int = 4
    mlp_ratio: float = 4.0
    div_weight: float = 0.1  # lambda: weight of the divergence head's loss
    kd_temperature: float = 1.0  # distillation: KL divergence between softened old-class distributions
    finetune_epochs: int = 20  # balanced fine-tuning on the memory after each stage from the second on
    finetune_lr: float | None = None  # None: train.lr
    mixup: bool = False  # DyTox+: MixUp on every training and fine-tuning batch (inputs and targets)
    mixup_alpha: float = 0.8  # mixing weights ~ Beta(alpha, alpha)
    # label smoothing of the targets MixUp mixes (timm's Mixup: off = s / seen classes, on = 1 - s + off), as
    # the official code does through its --smoothing 0.1; only with mixup (plain DyTox trains on hard targets)
    mixup_smoothing: float = 0.1
    # self-attention blocks: "gpsa", ConViT's gated positional self-attention (the official CIFAR model: all
    # its self-attention blocks), locally initialised with `locality_strength`; "mhsa", plain multi-head
    # self-attention (what this project ran before)
    sab: Literal["gpsa", "mhsa"] = "gpsa"
    locality_strength: float = 1.0  # GPSA: how sharply each head's initial positional attention focuses
    # stochastic depth: the rate rises linearly from 0 at the first self-attention block to `drop_path` at the
    # task-attention block (official: linspace over all depth + 1 blocks, --drop-path 0.1); off at evaluation
    drop_path: float = 0.1
    # the task token each stage adds: "fresh", drawn from a truncated normal (std 0.02) as the official code
    # does; "copy", a copy of the previous stage's token
    new_token: Literal["fresh", "copy"] = "fresh"
    # distillation's KL divergence: "mean" (official: F.kl_div reduction="mean", the sum over batch x old
    # classes divided by both), or "batchmean" (divided by the batch only: old classes times larger)
    kd_reduction: Literal["mean", "batchmean"] = "mean"

    def check(self) -> None:
        for key in ("embed_dim", "depth", "heads", "patch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"learner.{key}: must be a positive integer, got {getattr(self, key)}")
        if self.embed_dim % self.heads:
            raise ConfigError(f"learner.embed_dim: {self.embed_dim} must be divisible by learner.heads ({self.heads})")
        if self.finetune_epochs < 0:
            raise ConfigError(f"learner.finetune_epochs: must be >= 0, got {self.finetune_epochs}")
        for key in ("mlp_ratio", "kd_temperature", "mixup_alpha"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"learner.{key}: must be > 0, got {getattr(self, key)}")
        if self.div_weight < 0:
            raise ConfigError(f"learner.div_weight: must be >= 0, got {self.div_weight}")
        if not 0 <= self.mixup_smoothing < 1:
            raise ConfigError(f"learner.mixup_smoothing: must be in [0, 1), got {self.mixup_smoothing}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"learner.drop_path: must be in [0, 1), got {self.drop_path}")
        if self.locality_strength <= 0:
            raise ConfigError(f"learner.locality_strength: must be > 0, got {self.locality_strength}")
        if self.finetune_lr is not None and self.finetune_lr <= 0:
            raise ConfigError(f"learner.finetune_lr: must be > 0 (null: train.lr), got {self.finetune_lr}")


def _mlp(dim: int, ratio: float) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + SA(LN(x)), then + MLP(LN(.)), each branch under stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = _mlp(dim, mlp_ratio)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


def gpsa_block(dim: int, heads: int, mlp_ratio: float, drop_path: float, locality_strength: float) -> nn.Module:
    """timm's ConViT block with gated positional self-attention, initialised as the official model: no q/k/v
    bias, truncated-normal (std 0.02) weights and zero biases, then GPSA's local init (v = identity, each head's
    positional attention centred on one neighbour offset). Needs a square grid of patches."""
    block = ConViTBlock(dim, heads, mlp_ratio, qkv_bias=False, drop_path=drop_path, norm_layer=nn.LayerNorm,
                        use_gpsa=True, locality_strength=locality_strength)
    for m in block.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    block.attn.local_init()
    return block


class TaskAttentionBlock(nn.Module):
    """Task attention: the query comes from the task token only; keys and values from [token, patches].

    Every task token sees the same patch tokens, so all T tokens go through in one pass: each token's scores
    over the patches are shared work, its score with itself is its own.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = _mlp(dim, mlp_ratio)
        self.drop_path = _drop_path(drop_path)

    def _drop(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, D): each (sample, token) pair dropped on its own,
        return self.drop_path(h.flatten(0, 1)).view_as(h)  # as when each token runs through the block alone

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:  # (T, D), (B, N, D) -> (B, T, D)
        (B, N, D), T, h = patches.shape, len(tokens), self.heads
        t, p = self.norm1(tokens), self.norm1(patches)
        q = self.q(t).view(T, h, D // h).transpose(0, 1)  # (h, T, d)
        k_self, v_self = self.kv(t).view(T, 2, h, D // h).permute(1, 2, 0, 3)  # each (h, T, d)
        k, v = self.kv(p).view(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
        scale = (D // h) ** -0.5
        own = ((q * k_self).sum(-1, keepdim=True) * scale).expand(B, -1, -1, -1)  # (B, h, T, 1)
        shared = torch.einsum("htd,bhnd->bhtn", q, k) * scale  # (B, h, T, N)
        a = torch.cat([own, shared], -1).softmax(-1)
        out = a[..., :1] * v_self + a[..., 1:] @ v  # (B, h, T, d)
        c = tokens + self._drop(self.proj(out.transpose(1, 2).reshape(B, T, D)))  # (B, T, D)
        return c + self._drop(self.mlp(self.norm2(c)))

    def one_token_at_a_time(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The paper's definition, literally: for each token, z = [token, patches], the query from the token.
        Same result as `forward` without stochastic depth (drop_path 0, or evaluation), T passes instead of one
        (the reference of tests and bench/)."""
        (B, N, D), h = patches.shape, self.heads
        out = []
        for token in tokens:
            z = self.norm1(torch.cat([token.expand(B, 1, D), patches], 1))  # (B, N+1, D)
            q = self.q(z[:, :1]).view(B, 1, h, D // h).transpose(1, 2)  # (B, h, 1, d)
            k, v = self.kv(z).view(B, N + 1, 2, h, D // h).permute(2, 0, 3, 1, 4)  # each (B, h, N+1, d)
            a = (q @ k.transpose(-1, -2) * (D // h) ** -0.5).softmax(-1)
            c = token + self.proj((a @ v).transpose(1, 2).reshape(B, 1, D))
            out.append(c + self.mlp(self.norm2(c)))
        return torch.cat(out, 1)  # (B, T, D)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                 reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) of the old classes' softmax at `temperature`, times T^2. (B, old) logits each.
    "mean": sum of p_t (log p_t - log p_s) over batch x old classes, divided by B x old (the official code);
    "batchmean": divided by B only."""
    T = temperature
    log_s, log_t = F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1)
    kl = (log_t.exp() * (log_t - log_s)).sum()  # written out: F.kl_div's "mean" is deprecated (to mean batchmean)
    return kl / (teacher.numel() if reduction == "mean" else len(teacher)) * T * T


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float, smoothing: float):
    """timm's batch MixUp as the official code runs it: targets (B, K) smoothed (off = s / K, on = 1 - s + off),
    one lam ~ Beta(alpha, alpha) drawn from torch's global generator (so a seeded run replays), and each
    sample mixed with the batch reversed. Returns (mixed x, mixed targets)."""
    K = targets.shape[1]
    targets = targets * (1 - smoothing) + smoothing / K
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam * x + (1 - lam) * x.flip(0), lam * targets + (1 - lam) * targets.flip(0)


def _classifier(dim: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, outputs))


class DyTox(Learner):
    """The DyTox transformer on images: its own encoder, trained end to end (use the identity backbone)."""

    Options = DyToxOptions
    trains_backbone = True
    needs_stage_boundaries = "it adds a task token and a classifier at each stage's start"
    stage_classes_only = True

    def __init__(self, options: DyToxOptions, ctx):
        super().__init__(options, ctx)
        o = options
        if ctx.backbone is not None and getattr(ctx.backbone, "name", "identity") != "identity":
            raise ConfigError(f"backbone.name: dytox is its own image encoder; set backbone.name: identity "
                              f"(got {ctx.backbone.name})")
        if len(ctx.input_shape) != 3:
            raise ConfigError(f"learner.name: dytox needs images (C, H, W); the data gives {tuple(ctx.input_shape)}")
        channels, height, width = ctx.input_shape
        if height % o.patch_size or width % o.patch_size:
            raise ConfigError(f"learner.patch_size: {o.patch_size} must divide the image size {height}x{width}")
        if o.sab == "gpsa" and height != width:
            raise ConfigError(f"learner.sab: gpsa needs square images (a square grid of patches), got "
                              f"{height}x{width}; use sab: mhsa")
        D = o.embed_dim
        self.tokenizer = nn.Conv2d(channels, D, o.patch_size, stride=o.patch_size)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, (height // o.patch_size) * (width // o.patch_size), D), std=0.02))
        rates = torch.linspace(0, o.drop_path, o.depth + 1).tolist()  # the last one: the task-attention block's
        self.blocks = nn.Sequential(*[
            gpsa_block(D, o.heads, o.mlp_ratio, rate, o.locality_strength) if o.sab == "gpsa"
            else SelfAttentionBlock(D, o.heads, o.mlp_ratio, rate) for rate in rates[:-1]])
        self.tab = TaskAttentionBlock(D, o.heads, o.mlp_ratio, rates[-1])
        self.task_tokens = nn.ParameterList()
        self.heads = nn.ModuleList()  # one classifier per stage
        self.div_head: nn.Module | None = None  # from the second stage on; replaced each stage
        self.stage_classes: list[list[int]] = []
        self.__dict__["teacher"] = None  # the frozen model of the previous stage (not a submodule: no state)

    # --- the model -----------------------------------------------------------------------------------------

    def encoder_modules(self) -> list[nn.Module | nn.Parameter]:
        """What the self-attention side is made of: tokenizer, positions, blocks."""
        return [self.tokenizer, self.pos, self.blocks]

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, T, D)
        patches = self.tokenizer(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        return self.tab(torch.cat(list(self.task_tokens)), self.blocks(patches))

    def seen_logits(self, e: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, seen classes), stage by stage
        return torch.cat([head(e[:, i]) for i, head in enumerate(self.heads)], 1)

    @property
    def columns(self) -> torch.Tensor:
        """Class id of each column of `seen_logits`."""
        return torch.tensor([c for classes in self.stage_classes for c in classes], dtype=torch.long)

    def column_of(self, y: torch.Tensor) -> torch.Tensor:
        """The `seen_logits` column of each label in `y`."""
        column = torch.full((self.ctx.num_classes,), -1, dtype=torch.long, device=y.device)
        column[self.columns.to(y.device)] = torch.arange(len(self.columns), device=y.device)
        return column[y]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes); unseen: -inf
        z = self.seen_logits(self.embeddings(x))
        out = z.new_full((len(x), self.ctx.num_classes), float("-inf"))
        out[:, self.columns.to(z.device)] = z
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeddings(x).flatten(1)  # every task's embedding, (B, T * D)

    def expand(self, classes: list[int]) -> None:
        """A new stage: one task token (fresh, or a copy of the last: `new_token`), its classifier, a fresh
        divergence head."""
        D, device = self.options.embed_dim, self.pos.device
        if len(self.task_tokens) and self.options.new_token == "copy":
            token = self.task_tokens[-1].detach().clone()
        else:
            token = nn.init.trunc_normal_(torch.zeros(1, D), std=0.02).to(device)
        self.task_tokens.append(nn.Parameter(token))
        self.heads.append(_classifier(D, len(classes)).to(device))
        self.div_head = _classifier(D, len(classes) + 1).to(device) if self.stage_classes else None
        self.stage_classes.append(list(classes))

    # --- the stage hooks -----------------------------------------------------------------------------------

    def begin_stage(self, stage) -> None:
        if self.stage_classes:
            self.__dict__["teacher"] = self._frozen_copy()
        self.expand(list(stage.classes))
        self.requires_grad_(True)
        for old in [*self.task_tokens[:-1], *self.heads[:-1]]:
            old.requires_grad_(False)
        self.optimizer = self.make_optimizer()

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.train()
        o = self.options
        col = self.column_of(y)
        seen, new = len(self.columns), len(self.stage_classes[-1])
        old = seen - new
        target = F.one_hot(col, seen).float()  # (B, seen)
        if o.mixup:
            x, target = mixup(x, target, o.mixup_alpha, o.mixup_smoothing)
        e = self.embeddings(x)
        z = self.seen_logits(e)
        loss = F.binary_cross_entropy_with_logits(z, target)
        teacher = self.__dict__["teacher"]
        if teacher is not None and old:
            alpha = old / seen
            with torch.no_grad():
                z_old = teacher.seen_logits(teacher.embeddings(x))  # (B, old)
            loss = (1 - alpha) * loss + alpha * distillation(z[:, :old], z_old, o.kd_temperature, o.kd_reduction)
        if self.div_head is not None:
            # the stage's classes, then "old" holding every earlier class's target mass (as the official code
            # builds its mixed divergence targets)
            div_target = torch.cat([target[:, old:], target[:, :old].sum(1, keepdim=True)], 1)  # (B, new + 1)
            loss = loss + o.div_weight * F.binary_cross_entropy_with_logits(self.div_head(e[:, -1]), div_target)
        self.step(loss, len(y))
        return float(loss.detach())

    def end_stage(self, stage, is_last: bool) -> None:
        o = self.options
        if len(self.stage_classes) > 1 and self.memory is not None and len(self.memory) and o.finetune_epochs:
            self.balanced_finetune(stage.index)
        self.__dict__["teacher"] = None
        self.optimizer = None  # every stage starts its own (the parameters it trains change)

    def balanced_finetune(self, stage_index: int) -> None:
        """Train tokens, task attention and classifiers on the memory (its per-class quota keeps it balanced),
        the self-attention blocks frozen (and in eval mode: no stochastic depth there, as in the official
        code); classification loss only, on MixUp batches when `mixup` is on."""
        o, t, device = self.options, self.ctx.train, self.ctx.device
        self.requires_grad_(True)
        for part in self.encoder_modules():
            part.requires_grad_(False)
        self.div_head.requires_grad_(False)
        self.optimizer = self.make_optimizer(o.finetune_lr)
        x, y = self.memory.x, self.memory.y
        gen = torch.Generator().manual_seed(stage_seed(self.ctx.seed, stage_index, "finetune"))
        if self.memory.distributed and world()[1] > 1:
            # each worker walks its own memory; their gradient all-reduces pair up only if every worker takes as
            # many batches, so where the memories differ in size (a class short of its quota in some worker's
            # rows) each keeps a random subset of the smallest one's size
            fewest = min(gather(len(y)))
            if fewest < len(y):
                keep = torch.randperm(len(y), generator=gen)[:fewest].sort().values
                x, y = x[keep], y[keep]
        batch = len(y) if t.batch_size is None else min(t.batch_size, len(y))
        # the official recipe: the training augmentation, a constant lr (no schedule), the run's precision
        augment = None if t.augment is None else transforms.Augment(t.augment, self.ctx.input_shape)
        precision = transforms.resolve_precision(t.precision, device, images=True)
        self.train()
        self.blocks.eval()
        for epoch in range(o.finetune_epochs):
            total = torch.zeros(2)
            for b, (_, mine) in enumerate(shard_batches(len(y), batch, gen)):
                xb, target = x[mine], F.one_hot(self.column_of(y[mine]), len(self.columns)).float().to(device)
                if augment is not None:
                    xb = augment(xb, transforms.augment_seed(self.ctx.seed, stage_index, epoch, b, world()[0], 1))
                xb = transforms.to_device(xb, device)
                if o.mixup:
                    xb, target = mixup(xb, target, o.mixup_alpha, o.mixup_smoothing)
                with transforms.autocast(precision, device):
                    loss = F.binary_cross_entropy_with_logits(self.seen_logits(self.embeddings(xb)), target)
                self.step(loss, len(mine))
                total += torch.tensor([float(loss.detach()) * len(mine), len(mine)])
        sum_across(total)
        log.info("stage %d: balanced fine-tuning on %d memory samples, %d epochs, loss %.4f", stage_index + 1,
                 len(y), o.finetune_epochs, float(total[0] / total[1].clamp(min=1)))

    # --- state ---------------------------------------------------------------------------------------------

    def state(self):
        return {**super().state(), "stage_classes": [list(c) for c in self.stage_classes]}

    def load_state(self, state) -> None:
        while len(self.stage_classes) < len(state["stage_classes"]):
            self.expand(state["stage_classes"][len(self.stage_classes)])
        super().load_state(state)

    def _frozen_copy(self) -> "DyTox":
        memory, optimizer = self.memory, self.optimizer
        self.memory = self.optimizer = None  # the teacher needs neither
        try:
            teacher = copy.deepcopy(self)
        finally:
            self.memory, self.optimizer = memory, optimizer
        return teacher.requires_grad_(False).eval()
