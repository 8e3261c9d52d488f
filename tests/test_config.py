"""The run schema: defaults, presets, overrides, and errors that name the key and what is accepted."""
import pytest

from orchestrator.config import apply_overrides, load_experiment
from workloads.config import ConfigError, flatten, parse_run_config, to_dict


def test_defaults_and_the_paper_model_preset():
    config = parse_run_config({"preset": "dkvb_paper_model", "train": {"epochs": 3}})
    assert (config.learner.num_codebooks, config.learner.num_keys, config.learner.key_dim) == (256, 4096, 14)
    assert config.learner.value_dim is None and config.learner.decoder == "vote"
    t = config.train
    assert (t.optimizer, t.lr, t.momentum, t.grad_clip, t.batch_size, t.label_smoothing) == \
        ("sgd", 0.3, 0.0, 1.0, 256, 0.1)
    assert t.epochs == 3  # the file's own keys win over the preset
    defaults = parse_run_config({})
    assert defaults.data.validation == 0.1 and defaults.learner.key_init_data == "first_stage"


def test_a_preset_named_after_a_paper_runs_its_protocol_or_says_it_is_the_model_only():
    # dkvb_paper set the model but not the protocol's 2000 epochs: it is renamed, and the old name says so
    with pytest.raises(ConfigError, match="'dkvb_paper' is now dkvb_paper_model.*dkvb_cifar10_paper.yaml"):
        parse_run_config({"preset": "dkvb_paper"})
    assert parse_run_config({"preset": "dkvb_paper_model"}).train.epochs == 1  # the model only: epochs untouched


@pytest.mark.parametrize("raw, message", [
    ({"learner": {"name": "dkvb", "num_keyz": 3}},
     r"learner\.num_keyz: unknown key; accepted keys in learner: name, num_codebooks"),
    ({"trian": {}}, r"trian: unknown key; accepted keys: name, seed"),
    ({"train": {"lr": "fast"}}, r"train\.lr: got 'fast'; accepted: a number"),
    ({"train": {"epochs": 2.5}}, r"train\.epochs: got 2\.5; accepted: an integer"),
    ({"data": {"source": "mnist"}}, r"data\.source: got 'mnist'; accepted: one of 'toy2d', 'digits'"),
    ({"learner": {"name": "gpt"}}, r"learner\.name: unknown learner 'gpt'; accepted: dkvb, dytox, finetune, linear, mlp"),
    ({"backbone": {"name": "vgg"}},
     r"backbone\.name: unknown backbone 'vgg'; accepted: clip_vit_b32, dino_resnet50, identity"),
    ({"data": {"stages": [[0, 1], [1, 2]]}}, r"data\.stages\[1\]: class 1 appears twice"),
    ({"train": {"epochs": 0}}, r"train\.epochs: must be a positive integer"),
    ({"learner": {"name": "dkvb", "topk": 9, "num_keys": 4}}, r"learner\.topk: 9 exceeds learner\.num_keys"),
    ({"preset": "fast"}, r"preset: unknown preset 'fast'; accepted: dkvb_paper_model"),
    ({"data": {"validation": 1.0}}, r"data\.validation: the held-out fraction must lie in \[0, 1\)"),
    ({"data": {"validation": -0.1}}, r"data\.validation: the held-out fraction must lie in \[0, 1\)"),
    ({"data": {"class_order": "order9"}}, r"data\.class_order: unknown order 'order9'; accepted: a list of class "
                                          r"ids, 'seed' \(shuffled with the run's seed\), cifar100_order1"),
    ({"data": {"class_order": [3, 1, 3]}}, r"data\.class_order: class 3 appears twice"),
    ({"data": {"class_order": "seed", "class_order_seed": 4}}, r"data\.class_order: set either class_order or"),
    ({"train": {"lr": "nan"}}, r"train\.lr: got 'nan'; accepted: a finite number"),
    ({"train": {"lr": float("nan")}}, r"train\.lr: got nan; accepted: a finite number"),
    ({"train": {"lr": float("inf")}}, r"train\.lr: got inf; accepted: a finite number"),
    ({"train": {"lr": 0}}, r"train\.lr: must be > 0, got 0"),
    ({"train": {"grad_clip": -1}}, r"train\.grad_clip: the largest gradient norm must be > 0 \(null: no clipping\)"),
    ({"train": {"momentum": -0.9}}, r"train\.momentum: must be >= 0, got -0\.9"),
    ({"train": {"weight_decay": -1e-4}}, r"train\.weight_decay: must be >= 0"),
    ({"seed": 2**70}, r"seed: must be an integer in \[0, 2\*\*63\), got 1180591620717411303424"),
    ({"seed": -1}, r"seed: must be an integer in \[0, 2\*\*63\)"),
    ({"data": {"class_order_seed": 2**64}}, r"data\.class_order_seed: must be an integer in \[0, 2\*\*63\)"),
    ({"learner": {"name": "dkvb", "value_dim": 0}}, r"learner\.value_dim: must be a positive integer"),
    ({"learner": {"name": "dkvb", "key_init_data": {"source": "digits", "num_samples": 0}}},
     r"learner\.key_init_data\.num_samples: must be a positive integer"),
    ({"learner": {"name": "dytox", "finetune_lr": -1}}, r"learner\.finetune_lr: must be > 0 \(null: train\.lr\)"),
    ({"learner": {"name": "dytox", "mixup_alpha": float("inf")}}, r"learner\.mixup_alpha: got inf; accepted: a finite"),
    ({"learner": {"name": "dkvb", "key_init_data": "all"}},
     r"learner\.key_init_data: got 'all'; accepted: one of 'first_stage', 'stream' or a mapping"),
])
def test_bad_configs_name_the_key_and_what_is_accepted(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(raw)


def test_yaml_scientific_notation_without_a_dot_is_a_number():
    assert parse_run_config({"train": {"lr": "1e-3"}}).train.lr == 1e-3


def test_setting_another_learner_name_drops_the_old_learners_options_with_a_note(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="orchestrator.config")
    base = load_experiment("search_spaces/toy2d_paper.yaml", ["learner.name=mlp", "learner.hidden=32"]).base
    assert (base.learner.name, base.learner.hidden) == ("mlp", 32)
    (note,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert note.startswith("--set learner.name=mlp: dropped the learner options of dkvb: num_codebooks, num_keys")
    assert "hidden" not in note  # what --set gives is kept
    # the same name keeps every option; a backbone switches the same way
    same = apply_overrides({"learner": {"name": "dkvb", "num_keys": 64}}, ["learner.name=dkvb"])
    assert same == {"learner": {"name": "dkvb", "num_keys": 64}}
    assert apply_overrides({"backbone": {"name": "small_cnn", "layer": "pool"}}, ["backbone.name=identity"]) == \
        {"backbone": {"name": "identity"}}


def test_overrides_set_dotted_keys_as_yaml_values():
    raw = apply_overrides({"learner": {"name": "dkvb"}}, ["learner.num_keys=512", "data.stages=[[0, 1]]",
                                                          "train.batch_size=null"])
    assert raw == {"learner": {"name": "dkvb", "num_keys": 512}, "data": {"stages": [[0, 1]]},
                   "train": {"batch_size": None}}
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["learner.num_keys"])


def test_flatten_gives_dotted_keys_of_the_resolved_config():
    flat = flatten(to_dict(parse_run_config({})))
    assert flat["learner.num_keys"] == 256 and flat["data.source"] == "digits" and flat["train.lr"] == 0.1


def test_shipped_experiment_files_are_valid():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.joinpath("search_spaces").glob("*.yaml"))
    assert {f.name for f in files} >= {"quickstart.yaml", "dkvb_cifar10_paper.yaml"}
    for f in files:
        experiment = load_experiment(f)
        assert experiment.description
    paper = load_experiment(files[[f.name for f in files].index("dkvb_cifar10_paper.yaml")]).base
    assert paper.train.epochs == 2000 and paper.data.classes_per_stage == 2 and paper.data.source == "cifar10"
    assert paper.learner.num_keys == 4096 and paper.learner.key_init_data.source == "cifar100"
    # five seeds, each with its own random class split, as the paper's sweep ran them
    paper_file = load_experiment(files[[f.name for f in files].index("dkvb_cifar10_paper.yaml")])
    assert paper.data.class_order == "seed" and [a.values for a in paper_file.axes] == [(1, 2, 3, 4, 5)]


def test_shipped_rivals_and_rehearsal_sweeps_cover_the_methods_and_memory_settings():
    from pathlib import Path

    from orchestrator.config import with_values

    folder = Path(__file__).parent.parent / "search_spaces"
    rivals = {a.key: a for a in load_experiment(folder / "rivals_digits.yaml").axes}
    assert [v["name"] for v in rivals["learner"].values] == ["linear", "mlp", "dkvb", "dytox"]
    assert rivals["rehearsal.memory_size"].values == (0, 200)
    rehearsal = {a.key for a in load_experiment(folder / "rehearsal_digits.yaml").axes}
    assert rehearsal == {"rehearsal.memory_size", "rehearsal.selection", "rehearsal.replay_ratio"}
    dkvb = {a.key for a in load_experiment(folder / "dkvb_digits_sweep.yaml").axes}
    assert {"learner.num_codebooks", "learner.num_keys", "rehearsal.memory_size"} <= dkvb
    dytox = load_experiment(folder / "dytox_cifar100.yaml")
    stages = [parse_run_config(with_values(dytox.base_raw, {"preset": p})).data.classes_per_stage
              for p in dict((a.key, a) for a in dytox.axes)["preset"].values]
    assert stages == [10, 5, 2]
