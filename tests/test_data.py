"""Sources in their real on-disk formats (written by the tests) and their cutting into stages."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_cifar
from workloads.config import ConfigError, DataConfig
from workloads.data.sources import TOY2D_CENTRES, DataError, load_source
from workloads.data.streams import SEED_PURPOSES, make_stream, stage_classes, stage_seed


def test_toy2d_matches_the_paper_figure():
    data = load_source(DataConfig(source="toy2d"))
    assert data.num_classes == 8
    assert len(data.y_train) == 8 * 50  # 100 per stage of 2 classes
    for c, centre in enumerate(TOY2D_CENTRES):
        points = data.x_train[data.y_train == c]
        assert torch.allclose(points.mean(0), torch.tensor(centre), atol=0.015)
        assert points.std(0).mean() == pytest.approx(0.035, abs=0.01)


def test_digits_are_8x8_images_with_a_fixed_stratified_split():
    a, b = load_source(DataConfig(source="digits")), load_source(DataConfig(source="digits"))
    assert a.x_train.shape[1:] == (1, 8, 8) and 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert len(a.y_train) + len(a.y_test) == 1797
    assert torch.equal(a.y_test, b.y_test)
    assert torch.bincount(a.y_test).min() >= 50


def test_cifar10_reads_the_python_pickle_format(tmp_path):
    base = write_cifar(tmp_path, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                        b"labels", 20, 10, "batches.meta", b"label_names", cycle=True)
    data = load_source(DataConfig(source="cifar10", root=str(tmp_path)))
    assert data.x_train.shape == (100, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (20, 3, 32, 32)
    raw = pickle.loads((base / "data_batch_2").read_bytes())
    assert torch.equal(data.x_train[20].flatten(), torch.from_numpy(raw[b"data"][0]))  # row-major CHW as released
    assert data.class_names[3] == "c3"


def test_cifar100_uses_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar-100-python", ["train", "test"], b"fine_labels", 30, 100, "meta", b"fine_label_names",
                cycle=True)  # labels 0..29 in both splits: every trained class is in the test set
    data = load_source(DataConfig(source="cifar100", root=str(tmp_path)))
    assert data.num_classes == 100 and len(data.y_train) == 30 and int(data.y_train.max()) < 100


def test_a_failed_cifar_download_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)  # this machine's network, made certain
    with pytest.raises(DataError, match=r"data.download: could not download cifar100 .*cifar-100-python/ folder"):
        load_source(DataConfig(source="cifar100", root=str(tmp_path), download=True))


def test_cifar_missing_folder_and_code_in_pickles_are_refused(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*not found.*download"):
        load_source(DataConfig(source="cifar10", root=str(tmp_path)))
    base = tmp_path / "cifar-100-python"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (base / "train").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_source(DataConfig(source="cifar100", root=str(tmp_path)))


def test_image_folder_reads_one_folder_per_class(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "emu"):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_source(DataConfig(source="image_folder", root=str(tmp_path), image_size=16, test_fraction=0.3))
    assert data.class_names == ["cat", "dog", "emu"]
    assert data.x_train.shape == (21, 3, 16, 16) and data.x_test.shape == (9, 3, 16, 16)
    assert torch.bincount(data.y_test).tolist() == [3, 3, 3]


def test_npz_vectors_and_errors(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.random.rand(12, 5), y_train=np.arange(12) % 4, x_test=np.random.rand(4, 5),
             y_test=np.arange(4))
    data = load_source(DataConfig(source="npz", root=str(path)))
    assert data.x_train.dtype == torch.float32 and data.num_classes == 4
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 2)))
    with pytest.raises(DataError, match="lacks array.*y_train"):
        load_source(DataConfig(source="npz", root=str(tmp_path / "bad.npz")))
    with pytest.raises(DataError, match="not found"):
        load_source(DataConfig(source="npz", root=str(tmp_path / "nope.npz")))


def test_stages_from_classes_per_stage_explicit_lists_and_a_class_order_seed():
    assert stage_classes(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert stage_classes(5, 2) == [[0, 1], [2, 3], [4]]
    assert stage_classes(8, stages=[[0, 4], [1, 5]]) == [[0, 4], [1, 5]]
    shuffled = stage_classes(10, 2, class_order_seed=3)
    assert shuffled == stage_classes(10, 2, class_order_seed=3) != stage_classes(10, 2)
    assert sorted(c for s in shuffled for c in s) == list(range(10))
    with pytest.raises(ConfigError, match="class 9 has no samples"):
        stage_classes(4, stages=[[0, 9]])


def test_make_stream_splits_samples_by_class_and_slices_like_a_list():
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x = torch.arange(8).float().unsqueeze(1)
    stream = make_stream(x, y, x, y, 4, [[0, 1], [2, 3]])
    assert len(stream) == 2 and stream.classes == [0, 1, 2, 3]
    assert stream[1].y_train.tolist() == [2, 3, 2, 3]
    assert stream[1:][0].classes == (2, 3)


def test_named_explicit_and_per_seed_class_orders():
    from workloads.data.orders import CLASS_ORDERS

    order1 = stage_classes(100, 10, class_order="cifar100_order1")
    assert order1[0] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]  # DER / PODNet / DyTox "order 1"
    assert [c for s in order1 for c in s] == CLASS_ORDERS["cifar100_order1"]
    assert stage_classes(6, 2, class_order=[5, 3, 1, 0]) == [[5, 3], [1, 0]]
    # class_order: seed shuffles with the run's own seed, so every seed of a sweep gets its own split
    by_seed = [stage_classes(10, 2, class_order="seed", seed=s) for s in range(5)]
    assert len({str(s) for s in by_seed}) == 5
    assert by_seed[1] == stage_classes(10, 2, class_order="seed", seed=1)
    with pytest.raises(ConfigError, match="data.class_order cifar100_order1: class 87 has no samples"):
        stage_classes(10, 2, class_order="cifar100_order1")


def test_validation_is_held_out_of_training_class_balanced_and_fixed_by_the_seed():
    from workloads.config import parse_run_config
    from workloads.runner import prepare

    def split(seed: int, validation: float = 0.1):
        return prepare(parse_run_config({"seed": seed, "data": {"source": "digits", "validation": validation},
                                         "learner": {"name": "linear"}})).stream

    stream = split(0)
    data = load_source(DataConfig(source="digits"))
    rows = {tuple(r.tolist()) for r in data.x_train.flatten(1)}
    for stage in stream:
        train = {tuple(r.tolist()) for r in stage.x_train.flatten(1)}
        val = {tuple(r.tolist()) for r in stage.x_val.flatten(1)}
        test = {tuple(r.tolist()) for r in stage.x_test.flatten(1)}
        assert not train & val and not val & test and val <= rows  # held out of training, not from test
        assert len(stage.y_train) + len(stage.y_val) == int(torch.isin(data.y_train, torch.tensor(stage.classes)).sum())
        for c in stage.classes:  # the same fraction of every class (round(0.1 n_c))
            n_c = int((data.y_train == c).sum())
            assert int((stage.y_val == c).sum()) == round(0.1 * n_c)
    same, other = split(0), split(1)
    assert all(torch.equal(a.x_val, b.x_val) for a, b in zip(stream, same))  # fixed by the seed...
    assert not all(torch.equal(a.x_val, b.x_val) for a, b in zip(stream, other))  # ...and drawn from it
    none = split(0, validation=0)
    assert not none.has_validation and none[0].x_val is None
    assert sum(len(s.y_train) for s in none) == len(data.y_train)


def test_each_purpose_stage_and_seed_draws_a_stream_of_its_own():
    # torch's CPU generator keeps a seed's low 32 bits: purposes once apart only above bit 40 drew one stream
    firsts = {}
    for seed in (0, 1):
        for stage in range(3):
            for purpose in SEED_PURPOSES:
                gen = torch.Generator().manual_seed(stage_seed(seed, stage, purpose))
                firsts[seed, stage, purpose] = tuple(torch.randint(2**62, (2,), generator=gen).tolist())
    assert len(set(firsts.values())) == len(firsts) == 2 * 3 * len(SEED_PURPOSES)
    # a hash of the text (not Python's per-process hash()): the same seed in every process and on every node
    assert stage_seed(0, 0, "batches") == 7594416573456828791
    with pytest.raises(ValueError, match="unknown seed purpose 'shuffle'; one of torch, batches"):
        stage_seed(0, 0, "shuffle")
