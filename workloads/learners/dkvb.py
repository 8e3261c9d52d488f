"""DKVB: frozen projections and keys, trained values, a decoder (Träuble et al., ICML 2023)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import psutil
import torch

from workloads.bottleneck import KeyValueBottleneck, bottleneck_bytes, learn_keys
from workloads.config import ConfigError, KeyInitData
from workloads.decoders import build_decoder
from workloads.distributed import sum_across, world
from workloads.features import state_digest
from workloads.keysearch import candidate_dtype, nearest_keys
from workloads.learners.base import Learner

log = logging.getLogger(__name__)

# Candidate reuse keeps each evaluation input's EVAL_CANDIDATES nearest keys per codebook (int16 where K fits:
# 10,000 inputs x 256 codebooks x 16 = 82 MB, plus the projections). The unused-key mask decides how often all
# of a pair's candidates are masked (that pair is then searched in full): on digits with keys on the whole
# stream (many keys masked until their stage), averaged over stages, m = 4 / 8 / 16 left 9-12% / 4-6% / 1-2%
# of pairs to the full search; 16 keeps that small at half the memory of 32.
EVAL_CANDIDATES = 16


@dataclass
class DKVBOptions:
    """Options of the Discrete Key-Value Bottleneck learner (the `dkvb_paper_model` preset sets the paper's sizes)."""

    name: Literal["dkvb"] = "dkvb"
    num_codebooks: int = 64  # C: heads, one codebook each
    num_keys: int = 256  # K: keys per codebook
    key_dim: int = 8  # d_k
    value_dim: int | None = None  # d_v; None = number of classes (required by the vote decoder)
    topk: int = 1  # values of the k nearest keys are averaged
    projection: Literal["fixed", "learnable", "sparse"] = "fixed"
    projection_density: float | None = None  # sparse: fraction of non-zeros (default 1 / sqrt(D))
    key_init: Literal["random", "kmeans", "ema"] = "kmeans"
    key_init_epochs: int = 10
    key_init_decay: float = 0.95  # ema
    key_init_batch_size: int = 1024  # ema
    # first_stage: the first stage's training inputs, unlabelled; stream: every stage's (transductive, uses
    # future inputs); or a source of its own ({source, root, ...})
    key_init_data: Literal["first_stage", "stream"] | KeyInitData = "first_stage"
    decoder: Literal["vote", "linear", "mlp"] = "vote"
    decoder_hidden: int = 128  # mlp decoder
    mask_unused: bool = True  # at evaluation, keys never selected in training cannot be fetched
    prune: bool = False  # after the last stage, drop never-selected key-value pairs
    index_cache: bool = True  # keys and projection frozen: look each training input up once per stage (exact)
    # keys and projection frozen: find each evaluation input's nearest keys once per run, answer every stage's
    # unused-key mask from them (exact: the same predictions as without)
    candidate_reuse: bool = True

    def check(self) -> None:
        for key in ("num_codebooks", "num_keys", "key_dim", "topk", "key_init_epochs", "key_init_batch_size",
                    "decoder_hidden"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"learner.{key}: must be a positive integer, got {getattr(self, key)}")
        if self.value_dim is not None and self.value_dim <= 0:
            raise ConfigError(f"learner.value_dim: must be a positive integer (null: the number of classes), "
                              f"got {self.value_dim}")
        if isinstance(self.key_init_data, KeyInitData):
            for key in ("num_samples", "image_size"):
                if getattr(self.key_init_data, key) <= 0:
                    raise ConfigError(f"learner.key_init_data.{key}: must be a positive integer, "
                                      f"got {getattr(self.key_init_data, key)}")
        if self.topk > self.num_keys:
            raise ConfigError(f"learner.topk: {self.topk} exceeds learner.num_keys ({self.num_keys})")
        if not 0 < self.key_init_decay < 1:
            raise ConfigError(f"learner.key_init_decay: must lie in (0, 1), got {self.key_init_decay}")
        if self.projection_density is not None and not 0 < self.projection_density <= 1:
            raise ConfigError(f"learner.projection_density: must lie in (0, 1], got {self.projection_density}")


@dataclass
class EvalInputs:
    """Evaluation inputs with what candidate reuse found once: projections z (N, C, d_k) and each codebook's
    nearest keys `cand` (N, C, m), valid for the keys tensor they were found with (at its version)."""

    x: torch.Tensor
    z: torch.Tensor
    cand: torch.Tensor
    keys: torch.Tensor
    keys_version: int

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows) -> "EvalInputs":
        return EvalInputs(self.x[rows], self.z[rows], self.cand[rows], self.keys, self.keys_version)

    def to(self, device) -> "EvalInputs":
        """z and cand already live on the learner's device; x moves only if it is ever needed."""
        return self


class DKVB(Learner):
    """Projection -> C codebooks (key lookup, value fetch) -> decoder; only values (and decoder) train."""

    Options = DKVBOptions

    @classmethod
    def check(cls, options: DKVBOptions, num_classes: int) -> None:
        o = options
        value_dim = o.value_dim or num_classes
        if o.decoder == "vote" and value_dim != num_classes:
            raise ConfigError(f"learner.value_dim: the vote decoder reads values as class logits, so value_dim "
                              f"must equal the number of classes ({num_classes}) or be null; got {o.value_dim}")
        need = bottleneck_bytes(o.num_codebooks, o.num_keys, o.key_dim, value_dim)
        available = psutil.virtual_memory().available
        if need > 0.8 * available:
            raise ConfigError(
                f"learner.num_codebooks x learner.num_keys: {o.num_codebooks} x {o.num_keys} codebook entries need "
                f"{need / 2**30:.1f} GiB for keys and values; {available / 2**30:.1f} GiB is available; "
                "lower num_codebooks, num_keys or key_dim")

    def __init__(self, options: DKVBOptions, ctx):
        super().__init__(options, ctx)
        o = options
        value_dim = o.value_dim or ctx.num_classes
        self.bottleneck = KeyValueBottleneck(ctx.input_dim, o.num_codebooks, o.num_keys, o.key_dim, value_dim,
                                             o.topk, o.projection, o.projection_density, seed=ctx.seed)
        self.bottleneck.mask_unused = o.mask_unused
        self.decoder = build_decoder(o.decoder, o.num_codebooks, value_dim, ctx.num_classes, o.decoder_hidden)
        t = ctx.train
        # Plain SGD on the voting decoder touches only the selected value rows: update just those (exact).
        self.sparse_update = (o.decoder == "vote" and o.projection != "learnable" and t.optimizer == "sgd"
                              and t.momentum == 0 and t.weight_decay == 0)
        self.index_cache = o.index_cache and o.projection != "learnable"
        # a learnable projection moves every input's position, so nothing found once stays nearest
        self.candidate_reuse = o.candidate_reuse and o.projection != "learnable"
        self._usage_synced: torch.Tensor | None = None  # key usage all processes agreed on at the last sync
        self._epoch_rows: torch.Tensor | None = None  # cached indices whose usage end_epochs counts (begin_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(x))  # (B, D) -> (B, C, d_v) -> (B, num_classes)

    @property
    def setup_data(self) -> str:
        return self.options.key_init_data if isinstance(self.options.key_init_data, str) else "own_source"

    def setup(self, unlabelled: torch.Tensor | None) -> None:
        """Learn the keys on unlabelled inputs (the stream's, as `setup_data` says, or key_init_data's source),
        then freeze them.

        With a feature store, keys are cached: runs that share the inputs and the key config learn them once.
        """
        o, ctx = self.options, self.ctx
        if unlabelled is not None:
            # the exact rows (which stages, which held-out split) identify them, whatever chose them
            inputs_key = state_digest({"unlabelled": unlabelled})
        else:
            unlabelled, inputs_key = ctx.features.unlabelled(o.key_init_data, ctx.seed)
            if unlabelled.shape[1] != ctx.input_dim:
                raise ConfigError(f"learner.key_init_data: {o.key_init_data.source} gives {unlabelled.shape[1]}-d "
                                  f"embeddings but the stream's are {ctx.input_dim}-d; use a source of the same kind")
        b = self.bottleneck

        def learn() -> torch.Tensor:
            with torch.no_grad():
                z = torch.cat([b.project(unlabelled[i:i + 4096].to(b.keys.device))
                               for i in range(0, len(unlabelled), 4096)])
            log.info("learning %s keys: %d codebooks x %d keys on %d unlabelled inputs", o.key_init,
                     o.num_codebooks, o.num_keys, len(z))
            return learn_keys(z, o.num_keys, o.key_init, o.key_init_epochs, o.key_init_decay,
                              o.key_init_batch_size, seed=ctx.seed).cpu()

        if ctx.features is None:
            keys = learn()
        else:
            projection = {k: v for k, v in b.state_dict().items() if k.startswith("proj")}
            # C and d_k on their own too: a C x d_k projection drawn from one seed has the same numbers for
            # 2 x 4 and 4 x 2, and keys of one shape must never be served to the other
            keys = ctx.features.keys({
                "inputs": inputs_key, "projection": state_digest(projection), "num_codebooks": o.num_codebooks,
                "key_dim": o.key_dim, "num_keys": o.num_keys,
                "init": o.key_init, "epochs": o.key_init_epochs, "decay": o.key_init_decay,
                "batch_size": o.key_init_batch_size, "seed": ctx.seed}, learn)
        b.keys.copy_(keys)

    def stage_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """With the index cache: the selected key indices (N, C, k), computed once for the stage."""
        if not self.index_cache:
            return x
        self.bottleneck.train()
        with torch.no_grad():
            idx = torch.cat([self.bottleneck.lookup(self.bottleneck.project(x[i:i + 1024]))
                             for i in range(0, len(x), 1024)])
        return idx.to(torch.int32) if self.bottleneck.num_keys < 2**31 else idx

    def begin_epochs(self, inputs: torch.Tensor | None) -> None:
        # With the index cache, epochs that take each cached row once select, per epoch, exactly the keys of the
        # stage's rows: usage grows by epochs x their counts, counted once at the end instead of every step
        # (per step, 65,536 increments scattered over C x K counters: ~14% of an epoch at the paper's sizes).
        self._epoch_rows = inputs if self.index_cache else None

    def end_epochs(self, epochs: int) -> None:
        if self._epoch_rows is not None and epochs > 0:
            self.bottleneck.count_usage(self._epoch_rows, times=epochs)
        self._epoch_rows = None

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if not self.training:  # (train() walks every module: at the paper's sizes 3-4% of an epoch, every step)
            self.train()
        if self.index_cache:
            idx = x  # int32 rows of the cache: the compiled step reads them as they are
        else:
            with torch.no_grad():
                idx = self.bottleneck.lookup(self.bottleneck.project(x))
        count = self._epoch_rows is None  # else end_epochs counts the stage's selections
        if self.sparse_update and world()[1] == 1:  # several processes: the dense path averages gradients
            t = self.ctx.train
            return self.bottleneck.sgd_step(idx, y, t.lr, t.grad_clip, t.label_smoothing, count)
        if count:
            self.bottleneck.count_usage(idx)  # with the index cache: the cached int32 rows, not copied again
        logits = self.decoder(self.bottleneck.fetch(idx.long()) if self.index_cache else self.bottleneck(x))
        loss = self.loss(logits, y)
        self.step(loss, len(y))
        return float(loss.detach())

    def begin_stage(self, stage) -> None:
        super().begin_stage(stage)
        self._usage_synced = self.bottleneck.usage.clone()

    def begin_online(self) -> None:
        super().begin_online()
        self._usage_synced = self.bottleneck.usage.clone()

    def sync_usage(self) -> None:
        """Data-parallel processes count key usage on their own slices only: give every process the total of
        what all counted since the last sync (at a stage's end, or task-free before the next prediction)."""
        if world()[1] > 1 and self._usage_synced is not None:
            delta = sum_across(self.bottleneck.usage - self._usage_synced)
            self.bottleneck.usage.copy_(self._usage_synced + delta)
            self._usage_synced = self.bottleneck.usage.clone()

    @torch.no_grad()
    def eval_inputs(self, x: torch.Tensor):
        """With candidate reuse: each input's projection and nearest keys per codebook (unmasked), found once."""
        if not self.candidate_reuse or not len(x):
            return x
        b, size = self.bottleneck, self.ctx.train.eval_batch_size
        m = min(b.num_keys, max(EVAL_CANDIDATES, b.topk))
        zs, cands = [], []
        # in the runner's evaluation batches: each batch projects exactly as predict() on it would
        for i in range(0, len(x), size):
            z = b.project(x[i:i + size].to(self.ctx.device))
            zs.append(z)
            cands.append(nearest_keys(z, b.keys, m).to(candidate_dtype(b.num_keys)))
        return EvalInputs(x, torch.cat(zs), torch.cat(cands), b.keys, b.keys._version)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        # task-free there is no end_stage: the first prediction after training (the runner's evaluation, on
        # every process alike) syncs the counters that mask unused keys; a no-op once synced
        if self.training and world()[1] > 1:
            self.sync_usage()
        if isinstance(x, EvalInputs):
            b = self.bottleneck
            if x.keys is not b.keys or x.keys._version != x.keys_version:  # keys changed (pruned): search anew
                return super().predict(x.x.to(self.ctx.device))
            self.eval()
            return self.decoder(b.fetch(b.lookup_candidates(x.cand, x.z)))
        return super().predict(x)

    def end_stage(self, stage, is_last: bool) -> None:
        self.sync_usage()
        if is_last and self.options.prune:
            self.bottleneck.prune()
            self.optimizer = None  # values were replaced; a later stage (after resume) makes a new optimiser
            self._usage_synced = self.bottleneck.usage.clone()  # of the pruned shape

    def load_state(self, state) -> None:
        self.bottleneck.resize_for_state(state["model"], prefix="bottleneck.")
        super().load_state(state)
