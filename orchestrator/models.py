"""A trained learner as files that load without unpickling: weights in safetensors, the rest in JSON.

A model folder holds
- `model.safetensors`: the learner's `state_dict()` (tensors only: safetensors cannot carry code);
- `clorch_model.json`: the format version, the run config that built the learner, its input shape, the
  learner's non-tensor state (a DyTox's classes per stage) and the weights file's sha256;
- `MLmodel`: MLflow's description, with a `clorch` flavour naming this module's `load_model` as the loader.

`load_model` rebuilds the learner from the registries (LEARNERS, backbones) by the names in the config and loads
the weights into it: nothing in the folder is executed, so a writer of the artifact store can change numbers,
never run code. The learner's rehearsal memory (training data) and optimiser stay out: they are resume state.
"""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.checkpoints import file_sha256

FORMAT = "clorch-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DESCRIPTION = "clorch_model.json"


class ModelFormatError(ValueError):
    """A model folder that is not a clorch model, is of another format version, or fails its checksum."""


def save_model(folder: Path, config, state: dict) -> Path:
    """Write the learner of a run state (`run_stream`'s on_stage_end) with the config that built it."""
    from mlflow.models import Model
    from safetensors.torch import save_file

    from workloads.config import to_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    learner_state = state["learner"]
    # clones: safetensors refuses tensors that share memory, and views of one buffer would
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in learner_state["model"].items()}
    save_file(tensors, str(folder / WEIGHTS))
    extra = {k: v for k, v in learner_state.items() if k not in ("model", "optimizer", "memory")}
    description = {"format": FORMAT, "version": FORMAT_VERSION, "config": to_dict(config),
                   "learner_shape": state["learner_shape"], "learner_state": extra,
                   "sha256": file_sha256(folder / WEIGHTS)}
    try:
        text = json.dumps(description, indent=1)
    except TypeError as e:
        raise TypeError(f"the learner's state has a value JSON cannot hold ({e}); only tensors go to "
                        f"{WEIGHTS}") from None
    (folder / DESCRIPTION).write_text(text)
    Model(flavors={"clorch": {"format_version": FORMAT_VERSION, "weights": WEIGHTS, "description": DESCRIPTION,
                              "loader": "orchestrator.models.load_model"}}).save(str(folder / "MLmodel"))
    return folder


def load_model(where: str | Path):
    """The learner saved at `where`: a model folder, or an MLflow model URI (`models:/<id>`,
    `models:/<name>/<version>`, `runs:/<run>/model`), on the CPU. Raises ModelFormatError for anything that is
    not an intact clorch model."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from workloads.config import parse_run_config
    from workloads.runner import rebuild_learner

    folder = Path(where)
    if not folder.is_dir():
        import mlflow

        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(where)))
    path = folder / DESCRIPTION
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{where}: no readable {DESCRIPTION} ({e}); not a clorch model") from None
    if description.get("format") != FORMAT or description.get("version") != FORMAT_VERSION:
        raise ModelFormatError(f"{where}: format {description.get('format')!r} version "
                               f"{description.get('version')!r}; this clorch reads {FORMAT} version {FORMAT_VERSION}")
    if file_sha256(folder / WEIGHTS) != description["sha256"]:
        raise ModelFormatError(f"{where}: {WEIGHTS} does not match the sha256 in {DESCRIPTION}: the weights "
                               "were changed or truncated")
    try:
        tensors: dict[str, torch.Tensor] = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{where}: {WEIGHTS} does not load ({e})") from None
    state = {"learner_shape": description["learner_shape"],
             "learner": {**description["learner_state"], "model": tensors, "optimizer": None, "memory": None}}
    learner = rebuild_learner(parse_run_config(description["config"]), state)
    learner.memory = None  # the model, without its training data
    return learner.eval()

