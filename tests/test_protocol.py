"""What makes a number reviewable: no stage's inputs before its stage, selection on validation, seeds aggregated."""
import numpy as np
import pytest
import torch

from workloads.config import parse_run_config
from workloads.runner import run_stream


def write_far_stages(path, per_class: int = 40):
    """A 2-D npz stream: classes 0 and 1 near the origin (stage 1), classes 2 and 3 near (100, 100) (stage 2)."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [101.0, 100.0]])

    def split(n: int):
        y = np.repeat(np.arange(4), n)
        return (centres[y] + 0.1 * rng.standard_normal((len(y), 2))).astype(np.float32), y

    x_train, y_train = split(per_class)
    x_test, y_test = split(per_class // 2)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def far_config(root: str, key_init_data: str = "first_stage"):
    return parse_run_config({
        "data": {"source": "npz", "root": root, "classes_per_stage": 2},
        "learner": {"name": "dkvb", "num_codebooks": 4, "num_keys": 8, "key_dim": 2, "key_init": "kmeans",
                    "key_init_data": key_init_data},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.3}})


@pytest.mark.parametrize("mode", ["first_stage", "stream"])
def test_default_keys_see_no_input_of_a_later_stage_and_stream_mode_does(tmp_path, mode):
    root = write_far_stages(tmp_path / "far.npz")
    states = []
    result = run_stream(far_config(root, mode), on_stage_end=lambda i, m, s: states.append(s))
    model = states[0]["learner"]["model"]
    keys, proj = model["bottleneck.keys"], model["bottleneck.proj"]  # (C, K, d_k), (D, C * d_k)
    with np.load(root) as f:
        x, y = torch.from_numpy(f["x_train"]), torch.from_numpy(f["y_train"])
    z = (x @ proj).view(len(x), 4, 2)  # every training input, projected into each codebook's key space
    first = z[y < 2]
    low, high = first.amin(0) - 1e-4, first.amax(0) + 1e-4  # (C, d_k): the box of stage 1's projected inputs
    inside = ((keys >= low.unsqueeze(1)) & (keys <= high.unsqueeze(1))).all(-1)  # (C, K)
    if mode == "first_stage":
        # k-means keys are means of inputs (or inputs themselves): all of them inside stage 1's box, so no input
        # of stage 2, a hundred units away, took part in key learning
        assert inside.all()
        assert result.protocol["future_inputs"] is False and result.protocol["setup_inputs"] == "first_stage"
    else:
        assert not inside.all()  # transductive: keys were placed on stage 2's inputs before stage 1
        assert result.protocol["future_inputs"] is True


def test_a_key_source_that_is_the_streams_own_data_set_counts_as_future_inputs():
    config = parse_run_config({"data": {"source": "digits"}, "learner": {
        "name": "dkvb", "num_codebooks": 4, "num_keys": 8, "key_dim": 2, "key_init": "random",
        "key_init_data": {"source": "digits", "num_samples": 100}}, "train": {"epochs": 1}})
    assert run_stream(config).protocol["future_inputs"] is True
