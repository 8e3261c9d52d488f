"""The feature cache and the key cache: encode each data source once per frozen backbone, learn keys once.

A sweep of many bottleneck configs reads the same embeddings: they are encoded once per
(backbone, weights digest, layer, data source, split, transform; for a domain stream also the domain's input
shift and the rows of its slice) and stored as an Arrow IPC file
(label + embedding columns, memory-mapped when read). DKVB keys are cached the same way, keyed by the
embeddings they were learned on and the key config. Every cache file is written to a temporary file and
renamed (atomic), built under a file lock (concurrent trials on a node build once while the others wait),
and verified on read (row count, checksum); a truncated or corrupt file is rebuilt with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import pyarrow as pa
import torch
from filelock import FileLock

from workloads.backbones import Backbone, Identity, build_backbone
from workloads.data.sources import LabelledData, load_source, source_identity, unit_square

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_ENV = "CLORCH_CACHE_DIR"
FORMAT_VERSION = 2  # bump when the file layout changes: old files then miss instead of misreading


def default_cache_dir() -> Path:
    """$CLORCH_CACHE_DIR, else $XDG_CACHE_HOME/clorch, else ~/.cache/clorch."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "clorch"


class CacheCorrupt(Exception):
    """A cache file exists but fails its integrity check."""


def digest(meta: Any) -> str:
    """A short, stable hex digest of a JSON-able description."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:24]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names and bytes): the same weights, wherever they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if tensor.is_sparse:
            tensor = tensor.to_dense()
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cached(path: Path, build: Callable[[Path], None], read: Callable[[Path], T], what: str) -> tuple[T, bool]:
    """read(path), building it first (atomically, under a lock) when missing or corrupt; returns (value, built)."""
    try:
        return read(path), False
    except FileNotFoundError:
        pass
    except CacheCorrupt as e:
        log.warning("%s cache %s is corrupt (%s); rebuilding it", what, path.name, e)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:  # another process may have built it while we waited for the lock
            return read(path), False
        except FileNotFoundError:
            pass
        except CacheCorrupt:
            path.unlink()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return read(path), True


# --- embeddings as Arrow IPC files --------------------------------------------------------------------------

def _checksum(x: np.ndarray, y: np.ndarray, meta: dict) -> str:
    """CRC32 over the columns and the metadata (all of it but the checksum): an edited `num_classes` or row
    count is as much a corruption as a flipped byte."""
    described = json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True, default=str)
    return f"{zlib.crc32(described.encode(), zlib.crc32(y.tobytes(), zlib.crc32(x.tobytes()))):08x}"


def write_features(path: Path, x: torch.Tensor, y: torch.Tensor, meta: dict) -> None:
    """(N, D) float32 embeddings and (N,) labels as an Arrow IPC file, with row count and checksum in its metadata."""
    xn = x.float().contiguous().numpy()
    yn = y.long().numpy()
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(xn.reshape(-1)), xn.shape[1])
    info = {**meta, "rows": len(yn), "dim": xn.shape[1]}
    info["checksum"] = _checksum(xn, yn, info)
    table = pa.table({"label": pa.array(yn), "embedding": embedding}).replace_schema_metadata(
        {"clorch": json.dumps(info)})
    with open(path, "wb") as f:
        with pa.ipc.new_file(f, table.schema) as writer:
            # one record batch: a file of several needs combine_chunks() on read, a copy instead of a mapping
            writer.write_table(table, max_chunksize=max(len(yn), 1))
        f.flush()
        os.fsync(f.fileno())


def read_features(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Memory-map an embeddings file and verify it; raises CacheCorrupt (or FileNotFoundError)."""
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        source = pa.memory_map(str(path))
        table = pa.ipc.open_file(source).read_all()
        info = json.loads(table.schema.metadata[b"clorch"])
        labels = table.column("label").to_numpy()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=True)
    except (pa.ArrowException, KeyError, ValueError, OSError) as e:
        raise CacheCorrupt(f"unreadable: {e}") from e
    if len(labels) != info["rows"] or flat.size != info["rows"] * info["dim"]:
        raise CacheCorrupt(f"{len(labels)} rows, expected {info['rows']}")
    x = flat.reshape(info["rows"], info["dim"])
    if _checksum(x, labels, info) != info.get("checksum"):
        raise CacheCorrupt("checksum mismatch")
    with warnings.catch_warnings():  # the mapped buffer is read-only and nothing writes to inputs
        warnings.simplefilter("ignore")
        return torch.from_numpy(x), torch.from_numpy(labels), info


# --- encoding -----------------------------------------------------------------------------------------------

def encode_precision(device: torch.device) -> str:
    """`bf16` (autocast) on a CUDA GPU that supports it, `fp32` elsewhere: what the frozen backbone runs in."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@torch.no_grad()
def encode_with_progress(backbone: Backbone, x: torch.Tensor, device: torch.device, what: str,
                         batch_size: int = 256, precision: str | None = None) -> torch.Tensor:
    """Embeddings (N, output_dim) through the frozen backbone, with a progress bar (images per second).

    On a GPU: raw batches go from pinned memory with non-blocking copies, the transform (resize, normalise) runs
    there too, and the backbone under bf16 autocast where supported; embeddings are stored as float32.
    `precision` (`fp32` or `bf16`) overrides that choice (bench/encode_throughput.py compares the two)."""
    from tqdm.auto import tqdm

    backbone.eval().to(device)
    cuda = device.type == "cuda"
    precision = precision or encode_precision(device)
    # on a GPU, embeddings land in pinned memory by non-blocking copies: no wait on each batch
    result = torch.empty(len(x), backbone.output_dim, pin_memory=cuda)
    started = time.perf_counter()
    with tqdm(total=len(x), desc=f"encoding {what}", unit="img", disable=not sys.stderr.isatty(),
              mininterval=1.0) as bar:
        for i in range(0, len(x), batch_size):
            raw = x[i:i + batch_size]
            if cuda:  # the raw batch (uint8 images: 4x smaller than floats) crosses the bus, not the transformed one
                batch = backbone.transform(raw.pin_memory().to(device, non_blocking=True))
            else:
                batch = backbone.transform(raw).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                embedding = backbone(batch).float()
            result[i:i + len(raw)].copy_(embedding, non_blocking=cuda)
            bar.update(len(raw))
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    log.info("encoded %s: %d inputs in %.1fs (%.0f per second, %s %s)", what, len(x), seconds,
             len(x) / max(seconds, 1e-9), device.type, precision)
    return result


@dataclass
class StreamFeatures:
    """A source's train and test embeddings."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


class FeatureStore:
    """Embeddings of data sources through one frozen backbone, cached on disk; also the home of the key cache.

    The identity backbone's "embeddings" are the inputs themselves: they are not written, but they still get
    keys, so keys learned on them are cached.
    """

    def __init__(self, backbone: Backbone, backbone_name: str, cache_dir: Path | None, device: torch.device):
        self.backbone, self.device = backbone, device
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.write_features = not isinstance(backbone, Identity)
        self.backbone_id = {"backbone": backbone_name, "layer": getattr(backbone, "layer", None),
                            "weights": state_digest(backbone.state_dict()) if self.write_features else None,
                            "transform": backbone.describe_transform(), "format": FORMAT_VERSION}
        self.encoded = 0  # inputs encoded by this store (0 when everything came from the cache)
        self.encode_seconds = 0.0

    def _key(self, source: dict, split: str) -> str:
        return digest({**self.backbone_id, "data": source, "split": split})

    def labelled_key(self, data_cfg, split: str) -> str:
        """The cache key of a source's whole `split` (a DataConfig's, or a KeyInitData's training inputs)."""
        return self._key(source_identity(data_cfg), split)

    def shifted_key(self, data_cfg, split: str, rows: torch.Tensor | None, shift) -> str:
        """The cache key of `split`'s `rows` (or all) under a domain's input `shift`."""
        return self._key({**source_identity(data_cfg), "shift": shift.describe(),
                          "rows": None if rows is None else digest(rows.tolist())}, split)

    def path(self, key: str) -> Path:
        """Where the embeddings file of `key` lives."""
        return self.cache_dir / "features" / f"{key}.arrow"

    def is_cached(self, key: str) -> bool:
        """Whether the embeddings file of `key` is there and verifies (a corrupt one counts as missing)."""
        try:
            read_features(self.path(key))
            return True
        except (FileNotFoundError, CacheCorrupt):
            return False

    def build(self, request: "CacheRequest") -> int:
        """Make sure `request`'s embeddings file exists, encoding it on a miss (the path every trial takes: same
        key, lock and atomic write); returns the number of inputs encoded here (0: it was there already)."""
        before = self.encoded
        self._split(request.key, request.what, request.load)
        return self.encoded - before

    def _split(self, key: str, what: str, load: Callable[[], tuple[torch.Tensor, torch.Tensor, int]]
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Embeddings, labels and label-space size of one split; `load` reads the raw split on a miss."""
        if not self.write_features:
            x, y, num_classes = load()
            return self.backbone(self.backbone.transform(x)), y, num_classes

        def build(tmp: Path) -> None:
            x, y, num_classes = load()
            started = time.perf_counter()
            embeddings = encode_with_progress(self.backbone, x, self.device, what)
            self.encoded += len(x)
            self.encode_seconds += time.perf_counter() - started
            # how it was encoded, for the record; not in the key, so every device shares one cache
            write_features(tmp, embeddings, y, {"key": key, "num_classes": num_classes, "device": self.device.type,
                                                "precision": encode_precision(self.device)})

        (x, y, info), built = cached(self.path(key), build, read_features, "feature")
        if not built:
            log.info("%s: %d embeddings served from the cache (%s)", what, len(y), key)
        return x, y, info["num_classes"]

    def labelled(self, data_cfg) -> StreamFeatures:
        """Train and test embeddings of a DataConfig's source; the source is read only if a split is missing."""
        source = source_identity(data_cfg)  # once: a folder source's fingerprint stats every file
        loaded: list[LabelledData] = []

        def split_loader(split: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor, int]]:
            def load():
                if not loaded:
                    loaded.append(load_source(data_cfg))
                d = loaded[0]
                return getattr(d, f"x_{split}"), getattr(d, f"y_{split}"), d.num_classes
            return load

        x_train, y_train, num_classes = self._split(self._key(source, "train"), f"{data_cfg.source} train",
                                                    split_loader("train"))
        x_test, y_test, _ = self._split(self._key(source, "test"), f"{data_cfg.source} test", split_loader("test"))
        return StreamFeatures(x_train, y_train, x_test, y_test, num_classes)

    def shifted(self, data_cfg, data: LabelledData, split: str, rows: torch.Tensor | None, shift) -> torch.Tensor:
        """Embeddings of `split`'s inputs (the `rows` given, or all) under a domain's input `shift`
        (workloads.data.shifts.Shift); the key holds the shift and the rows, so shifted inputs never meet
        an unshifted file."""
        key = self.shifted_key(data_cfg, split, rows, shift)

        def load():
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            if rows is not None:
                x, y = x[rows], y[rows]
            return shift(x), y, data.num_classes
        x, _, _ = self._split(key, f"{data_cfg.source} {split} (domain {shift.stage})", load)
        return x

    def unlabelled(self, cfg, seed: int) -> tuple[torch.Tensor, str]:
        """Embeddings of a KeyInitData source's training inputs (at most num_samples), and their key."""
        source = source_identity(cfg)
        if cfg.source == "unit_square":
            key = self._key({**source, "seed": seed}, "train")
            x, _, _ = self._split(key, "unit_square", lambda: (
                unit_square(cfg.num_samples, seed), torch.zeros(cfg.num_samples, dtype=torch.long), 0))
            return x, key
        key = self.labelled_key(cfg, "train")

        def load():
            d = load_source(cfg)
            return d.x_train, d.y_train, d.num_classes
        x, _, _ = self._split(key, f"{cfg.source} train", load)
        if len(x) > cfg.num_samples:
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: cfg.num_samples]
            x = x[keep.sort().values]
            key = digest({"of": key, "subset": cfg.num_samples, "seed": seed})
        return x, key

    def keys(self, meta: dict, learn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """DKVB keys for `meta` (inputs' key + key config), learned by `learn()` only on a cache miss."""
        key = digest({"format": FORMAT_VERSION, **meta})
        path = self.cache_dir / "keys" / f"{key}.pt"

        def build(tmp: Path) -> None:
            keys = learn().contiguous()
            torch.save({"keys": keys, "checksum": _checksum(keys.numpy(), np.zeros(0), meta), "meta": meta}, tmp)

        def read(p: Path) -> torch.Tensor:
            if not p.exists():
                raise FileNotFoundError(p)
            try:
                saved = torch.load(p, map_location="cpu", weights_only=True)
                keys = saved["keys"]
            except Exception as e:  # torch raises several types for a truncated zip / pickle
                raise CacheCorrupt(f"unreadable: {e}") from e
            if _checksum(keys.numpy(), np.zeros(0), saved.get("meta", {})) != saved["checksum"]:
                raise CacheCorrupt("checksum mismatch")
            return keys

        keys, built = cached(path, build, read, "key")
        log.info("keys %s: %s", key, "learned and cached" if built else "served from the cache")
        return keys


# --- what a run reads: the requests a scheduler can fill before any run starts ------------------------------

@dataclass
class CacheRequest:
    """One embeddings file a run reads: its key, what it holds in words, and how to read its raw inputs."""

    key: str
    what: str
    load: Callable[[], tuple[torch.Tensor, torch.Tensor, int]]  # raw inputs, labels, label-space size


def feature_store(config, device: torch.device) -> FeatureStore:
    """The feature store a run of `config` reads, with its backbone built as workloads.runner.prepare builds it
    (random weights seeded by config.seed, so that the weights digest, and with it every key, is the run's)."""
    from workloads.data.sources import source_shape

    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, source_shape(config.data))
    backbone.requires_grad_(False)
    return FeatureStore(backbone, config.backbone.name, config.cache_dir, device)


def feature_requests(store: FeatureStore, config, data: LabelledData | None = None) -> list[CacheRequest]:
    """Every embeddings file a run of `config` reads through `store` (the stream's splits, or each domain's
    slices, and a DKVB's own key-init source), in the order the run reads them; none for the identity backbone,
    whose inputs are not stored. `data`: the stream's source, when loaded already (a domain stream needs it for
    its slices). The learner must be one that keeps its backbone frozen."""
    from workloads.config import KeyInitData
    from workloads.data.shifts import stage_shifts
    from workloads.data.streams import domain_slices

    if not store.write_features:
        return []
    d = config.data
    loaded: list[LabelledData] = [data] if data is not None else []

    def source() -> LabelledData:
        if not loaded:
            loaded.append(load_source(d))
        return loaded[0]

    def whole(split: str):
        return lambda: (getattr(source(), f"x_{split}"), getattr(source(), f"y_{split}"), source().num_classes)

    requests = []
    if d.stream == "domain_incremental":
        shifts = stage_shifts(d.num_domains or len(d.shifts), d.shift, d.shifts)
        slices = domain_slices(source().y_train, len(shifts), config.seed)
        for shift, rows in zip(shifts, slices):
            for split, part in (("train", rows), ("test", None)):
                def load(split=split, part=part, shift=shift):
                    x, y = getattr(source(), f"x_{split}"), getattr(source(), f"y_{split}")
                    if part is not None:
                        x, y = x[part], y[part]
                    return shift(x), y, source().num_classes
                requests.append(CacheRequest(store.shifted_key(d, split, part, shift),
                                             f"{d.source} {split} (domain {shift.stage})", load))
    else:  # class-incremental and user streams read the whole splits
        requests += [CacheRequest(store.labelled_key(d, split), f"{d.source} {split}", whole(split))
                     for split in ("train", "test")]
    own = getattr(config.learner, "key_init_data", None)
    if isinstance(own, KeyInitData) and own.source != "unit_square":  # unit_square is 2-d points: identity only
        def load_own():
            s = load_source(own)
            return s.x_train, s.y_train, s.num_classes
        requests.append(CacheRequest(store.labelled_key(own, "train"), f"{own.source} train", load_own))
    return requests
