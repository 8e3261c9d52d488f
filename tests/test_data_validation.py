"""Data validated at the door: every bad array is refused by one line naming the file, the array, the index and
what is accepted, before any work (no cache file, no result written)."""
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_cifar
from workloads.config import DataConfig, KeyInitData
from workloads.data.sources import DataError, load_source


def good_arrays() -> dict:
    """4 classes of 5-d vectors: 12 training and 8 test samples, every class in both splits."""
    rng = np.random.default_rng(0)
    return {"x_train": rng.random((12, 5)), "y_train": np.arange(12) % 4,
            "x_test": rng.random((8, 5)), "y_test": np.arange(8) % 4}


def _set(key, index, value):
    def change(a):
        a[key] = a[key].astype(float)
        a[key][index] = value
    return change


def _replace(**arrays):
    return lambda a: a.update(arrays)


BAD_NPZ = [  # (what is wrong, how the good arrays are spoiled, what the message must say after "data.root: PATH: ")
    ("float label", _set("y_train", 5, 0.7),
     r"y_train\[5\] = 0\.7 is not an integer class id; accepted: integer class ids 0, 1, 2, \.\.\. "
     r"\(floats only when whole numbers"),
    ("NaN label", _set("y_test", 2, np.nan), r"y_test\[2\] = nan is not an integer class id; accepted: integer"),
    ("NaN in x_test", _set("x_test", (3, 1), np.nan),
     r"x_test holds 1 NaN and 0 inf value\(s\), the first in sample 3 \(x_test\[3\]\); accepted: finite numbers"),
    ("inf in x_train", lambda a: (_set("x_train", (7, 0), np.inf)(a), _set("x_train", (9, 4), -np.inf)(a)),
     r"x_train holds 0 NaN and 2 inf value\(s\).*the first in sample 7 \(x_train\[7\]\); accepted: finite numbers"),
    ("label 1e9", _set("y_train", 2, 1e9),
     r"y_train\[2\] = 1000000000 is not a plausible class id for 20 samples; accepted: class ids 0\.\.1999"),
    ("integer label 1e9", lambda a: a["y_test"].__setitem__(6, 10**9),
     r"y_test\[6\] = 1000000000 is not a plausible class id for 20 samples; accepted: class ids 0\.\.1999"),
    ("negative label", lambda a: a["y_test"].__setitem__(1, -1),
     r"y_test\[1\] = -1 is negative; accepted: class ids 0, 1, 2, \.\.\."),
    ("one class only", _replace(y_train=np.zeros(12, dtype=int), y_test=np.zeros(8, dtype=int)),
     r"y_train holds a single class \(0, '0'\); accepted: at least two classes in the training data"),
    ("a trained class absent from the test set", _replace(y_test=np.arange(8) % 3),
     r"class 3 \('3'\) has 3 sample\(s\) in y_train but none in y_test \(1 trained class\(es\) missing from the "
     r"test set\); accepted: every class in the training data also present in the test set"),
    ("x of one dimension", _replace(x_train=np.zeros(12)),
     r"x_train has shape \(12,\) \(1 dimension\(s\)\); accepted: vectors \(N, D\) or images \(N, C, H, W\) with "
     r"C = 1 \(grey\) or 3 \(RGB\)"),
    ("x of five dimensions", _replace(x_train=np.zeros((12, 2, 3, 4, 5))),
     r"x_train has shape \(12, 2, 3, 4, 5\) \(5 dimension\(s\)\); accepted: vectors \(N, D\) or images"),
    ("images of 2 channels",
     _replace(x_train=np.zeros((12, 2, 4, 4), np.uint8), x_test=np.zeros((8, 2, 4, 4), np.uint8)),
     r"x_train has shape \(12, 2, 4, 4\): 2 channels; accepted: vectors \(N, D\) or images \(N, C, H, W\) with "
     r"C = 1 \(grey\) or 3 \(RGB\)"),
    ("channels-last images", _replace(x_test=np.zeros((8, 4, 4, 3), np.uint8)),
     r"x_test has shape \(8, 4, 4, 3\): 4 channels \(channels last\? store them as \(N, C, H, W\)\); accepted"),
    ("mismatched lengths", _replace(y_train=np.arange(11) % 4),
     r"x_train has 12 rows but y_train has 11; accepted: one label per input"),
    ("string labels", _replace(y_train=np.array(list("abcdabcdabcd"))),
     r"y_train has dtype <U1 \(first value 'a'\); accepted: integer class ids 0, 1, 2, \.\.\."),
    ("string inputs", _replace(x_test=np.array([["a"] * 5] * 8)),
     r"x_test has dtype <U1; accepted: numbers"),
    ("one-hot labels", _replace(y_train=np.eye(4)[np.arange(12) % 4]),
     r"y_train has shape \(12, 4\); accepted: one integer class id per sample, shape \(N,\)"),
    ("splits of different input shapes", _replace(x_test=np.zeros((8, 6))),
     r"x_test has inputs of shape \(6,\) but x_train \(5,\); accepted: the same input shape in both splits"),
    ("an empty test set", _replace(x_test=np.zeros((0, 5)), y_test=np.zeros(0, dtype=int)),
     r"x_test and y_test hold no samples; accepted: at least one sample per split"),
]


def write_npz(path, spoil=None):
    arrays = good_arrays()
    if spoil is not None:
        spoil(arrays)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("spoil, message", [case[1:] for case in BAD_NPZ], ids=[case[0] for case in BAD_NPZ])
def test_a_bad_npz_file_is_refused_naming_the_file_the_array_and_what_is_accepted(tmp_path, spoil, message):
    path = write_npz(tmp_path / "bad.npz", spoil)
    with pytest.raises(DataError) as info:
        load_source(DataConfig(source="npz", root=str(path)))
    text = str(info.value)
    assert text.startswith(f"data.root: {path}: "), text
    assert re.search(message, text), text
    assert "\n" not in text


def test_whole_float_labels_are_accepted_as_integers(tmp_path):
    arrays = good_arrays()
    np.savez(tmp_path / "floats.npz", x_train=arrays["x_train"], y_train=arrays["y_train"].astype(np.float32),
             x_test=arrays["x_test"], y_test=arrays["y_test"].astype(float).reshape(-1, 1))  # (N, 1) as well
    data = load_source(DataConfig(source="npz", root=str(tmp_path / "floats.npz")))
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.y_train.tolist() == (np.arange(12) % 4).tolist() and data.y_test.tolist() == [0, 1, 2, 3] * 2
    assert data.num_classes == 4 and data.class_names == ["0", "1", "2", "3"]
    assert data.x_train.dtype == torch.float32


def test_a_key_init_source_needs_no_second_class_but_finite_inputs(tmp_path):
    """Keys are learned on inputs only: dummy labels of one class are fine there, NaN inputs are not."""
    path = write_npz(tmp_path / "keys.npz", _replace(y_train=np.zeros(12, dtype=int), y_test=np.zeros(8, dtype=int)))
    assert len(load_source(KeyInitData(source="npz", root=str(path))).x_train) == 12
    write_npz(path, _set("x_train", (4, 2), np.nan))
    with pytest.raises(DataError, match=re.escape(f"learner.key_init_data.root: {path}: x_train holds 1 NaN")):
        load_source(KeyInitData(source="npz", root=str(path)))


def _image(path, rng):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_an_image_folder_of_one_class_or_a_class_of_one_image_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    for i in range(6):
        _image(tmp_path / "cat" / f"{i}.png", rng)
    with pytest.raises(DataError, match=re.escape(f"data.root: {tmp_path}: y_train holds a single class (0, 'cat'); "
                                                  "accepted: at least two classes")):
        load_source(DataConfig(source="image_folder", root=str(tmp_path), image_size=8))
    (tmp_path / "dog").mkdir()
    _image(tmp_path / "dog" / "0.png", rng)
    with pytest.raises(DataError, match=re.escape(f"data.root: class folder {tmp_path / 'dog'} holds 1 image; "
                                                  "accepted: at least 2 images per class")):
        load_source(DataConfig(source="image_folder", root=str(tmp_path), image_size=8))


def test_cifar_labels_beyond_the_release_classes_are_refused(tmp_path):
    base = write_cifar(tmp_path, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                       b"labels", 20, 10, "batches.meta", b"label_names", cycle=True)
    batch = pickle.loads((base / "test_batch").read_bytes())
    batch[b"labels"][3] = 10
    (base / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=re.escape(f"data.root: {base}: y_test[3] = 10 is out of range; accepted: "
                                                  "class ids 0..9 (the source has 10 classes)")):
        load_source(DataConfig(source="cifar10", root=str(tmp_path)))


