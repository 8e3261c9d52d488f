"""Sweep axes: validated against the run schema before anything runs; cache-relevant combinations."""
import pytest

from orchestrator.config import load_experiment
from orchestrator.search_space import cache_combinations, parse_sweep
from workloads.config import ConfigError

BASE = {"learner": {"name": "dkvb"}}


def test_axes_of_every_kind_parse():
    axes = parse_sweep({
        "learner.num_keys": {"grid": [64, 256]}, "learner.key_init": {"choice": ["kmeans", "ema"]},
        "train.lr": {"loguniform": [0.01, 1.0]}, "train.momentum": {"uniform": [0.0, 0.9]},
        "learner.num_codebooks": {"randint": [8, 65]}}, BASE)
    assert [(a.key, a.kind) for a in axes] == [
        ("learner.num_keys", "grid"), ("learner.key_init", "choice"), ("train.lr", "loguniform"),
        ("train.momentum", "uniform"), ("learner.num_codebooks", "randint")]


@pytest.mark.parametrize("sweep, message", [
    ({"learner.num_keyz": {"grid": [1, 2]}}, r"sweep\.learner\.num_keyz: learner\.num_keyz: unknown key"),
    ({"learner.num_keys": {"grid": []}}, r"sweep\.learner\.num_keys: grid needs a non-empty list"),
    ({"train.lr": {"uniform": [1.0, 0.1]}},
     r"sweep\.train\.lr: uniform bounds are inverted.*low 1\.0 must be < high 0\.1"),
    ({"train.lr": {"loguniform": [0.0, 0.1]}}, r"loguniform needs low > 0"),
    ({"train.lr": {"normal": [0, 1]}}, r"unknown axis kind 'normal'; accepted: grid, choice, uniform, loguniform"),
    ({"learner.decoder": {"choice": ["vote", "transformer"]}}, r"learner\.decoder: got 'transformer'"),
    ({"learner.num_keys": {"randint": [1.5, 8]}}, r"randint needs integer bounds"),
])
def test_bad_axes_name_the_axis_and_what_is_accepted(sweep, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(sweep, BASE)


def test_cache_combinations_cross_only_axes_that_change_caches():
    axes = parse_sweep({"learner.num_keys": {"grid": [64, 256]}, "seed": {"grid": [0, 1]},
                        "train.lr": {"grid": [0.1, 0.3, 1.0]}, "learner.key_dim": {"randint": [2, 9]}}, BASE)
    combos, sampled = cache_combinations(axes)
    assert combos == [{"learner.num_keys": 64, "seed": 0}, {"learner.num_keys": 64, "seed": 1},
                      {"learner.num_keys": 256, "seed": 0}, {"learner.num_keys": 256, "seed": 1}]
    assert [a.key for a in sampled] == ["learner.key_dim"]


def test_swept_blocks_and_presets_count_as_cache_axes():
    axes = parse_sweep({"learner": {"grid": [{"name": "mlp"}, {"name": "dkvb", "num_keys": 64}]},
                        "rehearsal.memory_size": {"grid": [0, 200]}}, BASE)
    combos, _ = cache_combinations(axes)
    assert combos == [{"learner": {"name": "mlp"}}, {"learner": {"name": "dkvb", "num_keys": 64}}]


def test_a_bad_sweep_in_a_file_fails_at_load(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("base: {}\nsweep:\n  learner.num_keys: {grid: []}\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: sweep\.learner\.num_keys: grid needs a non-empty list"):
        load_experiment(path)


def test_a_swept_learner_block_shows_as_one_readable_cell():
    from orchestrator.sweep import short_value

    assert short_value({"name": "mlp", "hidden": 128}) == "mlp(hidden=128)"
    assert short_value({"name": "linear"}) == "linear()" and short_value(0.3) == 0.3


def test_random_search_draws_grid_axes_and_grid_search_crosses_them(tmp_path):
    """With `search: grid` Tune crosses grid axes and samples the rest per grid point; with `search: random`
    every point is drawn, grid axes as choices, num_samples points in all."""
    from ray.tune.search.sample import Categorical
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.sweep import param_space, parse_tune

    path = tmp_path / "s.yaml"
    path.write_text("base: {learner: {name: dkvb}}\nsweep:\n  learner.num_keys: {grid: [16, 32, 64]}\n"
                    "  train.lr: {loguniform: [0.01, 1.0]}\n")
    experiment = load_experiment(path)
    grid = param_space(experiment, parse_tune({"num_samples": 2}, experiment))["sweep"]
    assert grid["learner.num_keys"] == {"grid_search": [16, 32, 64]}
    assert sorted(v["sweep"]["learner.num_keys"] for _ in range(2) for _, v in generate_variants({"sweep": grid})) \
        == [16, 16, 32, 32, 64, 64]  # every grid point, each with its own draws of the rest
    drawn = param_space(experiment, parse_tune({"search": "random", "num_samples": 2}, experiment))["sweep"]
    assert isinstance(drawn["learner.num_keys"], Categorical) and drawn["learner.num_keys"].categories == [16, 32, 64]
    assert len(list(generate_variants({"sweep": drawn}))) == 1  # one point per sample: nothing crossed
