"""Domain-incremental and user streams: every class in every stage, stage s on its own slice under shift s (or
on the stage ids shipped with the data), scored per domain, resumed exactly, cached under the shift."""
import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import rotate

from workloads.config import ConfigError, DataConfig, parse_run_config
from workloads.data.shifts import SHIFTS, stage_shifts
from workloads.data.sources import DataError, load_source
from workloads.data.streams import domain_slices
from workloads.runner import prepare, preflight, run_stream

ROTATED = {"source": "digits", "stream": "domain_incremental", "num_domains": 5,
           "shift": {"name": "rotation", "step": 20}}


def config(data: dict, learner: dict | None = None, rehearsal: dict | None = None, **train):
    return parse_run_config({"seed": 0, "data": data, "learner": learner or {"name": "mlp", "hidden": 32},
                             "train": {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.1, **train},
                             "rehearsal": rehearsal or {}})


def test_a_rotated_digits_stream_holds_every_class_on_disjoint_slices_and_shares_its_test_samples():
    stream = prepare(config(ROTATED)).stream
    raw = load_source(DataConfig(source="digits"))
    assert len(stream) == 5 and stream.axis == "domain"
    slices = domain_slices(raw.y_train, 5, seed=0)
    assert sum(len(s) for s in slices) == len(raw.y_train)
    assert len(torch.cat(slices).unique()) == len(raw.y_train)  # disjoint: no training sample in two domains
    for s, stage in enumerate(stream):
        assert stage.classes == tuple(range(10))  # the whole label space, every stage
        for y in (stage.y_train, stage.y_val, stage.y_test):
            assert set(y.tolist()) == set(range(10))
        assert len(stage.y_train) + len(stage.y_val) == len(slices[s])
        # domain s's test set is the whole test data rotated by 20 s degrees, flattened for the identity backbone
        expected = rotate(raw.x_test, 20.0 * s, interpolation=InterpolationMode.BILINEAR).flatten(1)
        assert torch.equal(stage.y_test, raw.y_test) and torch.allclose(stage.x_test, expected)
    assert not torch.allclose(stream[0].x_test, stream[1].x_test)
    # the training slices hold different samples: their (rotation undone) rows never coincide in content
    train0 = {tuple(r.tolist()) for r in raw.x_train[slices[0]].flatten(1)}
    train1 = {tuple(r.tolist()) for r in raw.x_train[slices[1]].flatten(1)}
    assert len(train0 & train1) <= 2  # digits holds a few duplicate images, nothing more


def test_the_slices_follow_the_seed_and_are_class_stratified():
    y = torch.arange(100) % 4
    a, b, c = domain_slices(y, 3, 0), domain_slices(y, 3, 0), domain_slices(y, 3, 1)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not all(torch.equal(p, q) for p, q in zip(a, c))
    for part in a:
        counts = torch.bincount(y[part], minlength=4)
        assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("name", ["permutation", "drift", "scale", "noise"])
def test_vector_shifts_leave_stage_0_alone_and_change_later_stages_reproducibly(name):
    x = torch.rand(6, 5)
    shifts = stage_shifts(3, parse_run_config({"data": {**ROTATED, "shift": {"name": name, "step": 0.5}}}).data.shift,
                          None)
    assert torch.equal(shifts[0](x), x)
    assert not torch.allclose(shifts[2](x), x) and torch.equal(shifts[2](x), shifts[2](x))
    if name == "permutation":  # a permutation of each row's features
        assert torch.equal(shifts[1](x).sort(1).values, x.sort(1).values)


@pytest.mark.parametrize("name,step", [("contrast", -0.2), ("blur", 0.5), ("rotation", 30)])
def test_image_shifts_keep_shape_and_dtype(name, step):
    x = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)
    shifts = stage_shifts(2, parse_run_config({"data": {**ROTATED, "shift": {"name": name, "step": step}}}).data.shift,
                          None)
    out = shifts[1](x)
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)


def test_one_shift_per_stage_from_a_list():
    cfg = config({"source": "digits", "stream": "domain_incremental",
                  "shifts": [{"name": "none"}, {"name": "rotation", "value": 90}, {"name": "blur", "value": 1.0}]})
    stream = prepare(cfg).stream
    raw = load_source(DataConfig(source="digits"))
    assert len(stream) == 3
    assert torch.allclose(stream[1].x_test, rotate(raw.x_test, 90.0).flatten(1))


@pytest.mark.parametrize("data,match", [
    ({"source": "digits", "stream": "domain_incremental"}, r"data.num_domains: a domain_incremental stream needs"),
    ({"source": "digits", "num_domains": 3}, r"data.num_domains: only for data.stream: domain_incremental"),
    ({**ROTATED, "classes_per_stage": 2, "stages": [[0, 1]]}, r"data.stages: cuts classes into stages"),
    ({**ROTATED, "shifts": [{"name": "none"}]}, r"data.shifts: set either data.shift .* not both"),
    ({**ROTATED, "shift": {"name": "twirl", "step": 1}}, r"data.shift.name: unknown shift 'twirl'; accepted: "),
    ({**ROTATED, "source": "toy2d"}, r"data.shift: rotation shifts images \(N, C, H, W\); this source gives inputs "
                                     r"of shape \(2,\); accepted for vectors: drift, noise, none, permutation, scale"),
    ({**ROTATED, "num_domains": 200}, r"data.num_domains: class \d has \d+ training sample\(s\), fewer than the 200"),
])
def test_domain_config_mistakes_are_one_line_before_any_work(data, match):
    with pytest.raises(ConfigError, match=match):
        preflight(config(data))


def test_dytox_is_refused_on_a_domain_stream():
    with pytest.raises(ConfigError, match=r"learner.name: dytox grows one head per stage"):
        config(ROTATED, {"name": "dytox"})


# --- user stage ids ---------------------------------------------------------------------------------------------

def user_arrays(rng=None) -> dict:
    """3 classes of 4-d vectors in 3 stages, ids shipped with the data; stage 2 is shifted by +3."""
    rng = rng or np.random.default_rng(0)
    y_train, y_test = np.arange(90) % 3, np.arange(45) % 3
    d_train, d_test = np.arange(90) // 30, np.arange(45) // 15
    centres = np.eye(3, 4) * 2

    def x(y, d):
        return centres[y] + 0.3 * rng.standard_normal((len(y), 4)) + 3.0 * (d == 2)[:, None]
    return {"x_train": x(y_train, d_train), "y_train": y_train, "d_train": d_train,
            "x_test": x(y_test, d_test), "y_test": y_test, "d_test": d_test}


def user_config(path, **over):
    return config({"source": "npz", "root": str(path), "stream": "user", **over})


def test_user_stage_ids_round_trip_through_an_npz(tmp_path):
    arrays = user_arrays()
    np.savez(tmp_path / "mine.npz", **arrays)
    stream = prepare(user_config(tmp_path / "mine.npz")).stream
    assert len(stream) == 3 and stream.axis == "domain"
    for s, stage in enumerate(stream):
        assert stage.classes == (0, 1, 2)
        rows = arrays["d_test"] == s
        assert torch.allclose(stage.x_test, torch.from_numpy(arrays["x_test"][rows]).float())
        assert len(stage.y_train) + len(stage.y_val) == int((arrays["d_train"] == s).sum())
    result = run_stream(user_config(tmp_path / "mine.npz"))
    assert len(result.test.accuracy_matrix) == 3 and result.protocol["axis"] == "domain"


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(d_train=a["d_train"][:-1]), r"d_train has 89 stage ids but y_train has 90 labels; "
                                                    r"accepted: one stage id per sample"),
    (lambda a: a["d_test"].__setitem__(4, 7), r"d_test\[4\] = 7 is a stage no training sample has; accepted: the "
                                              r"stage ids of d_train \(0, 1, 2\)"),
    (lambda a: a.update(d_test=a["d_test"] % 2), r"stage 2 has training samples but none in the test set"),
])
def test_bad_user_stage_ids_are_one_line(tmp_path, change, match):
    arrays = user_arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=r"data.root: .*bad.npz: " + match):
        preflight(user_config(tmp_path / "bad.npz"))


def test_a_user_stream_needs_a_source_with_stage_ids():
    with pytest.raises(ConfigError, match=r"data.stream: user needs stage ids shipped with the data .* data.source "
                                          r"digits has none"):
        preflight(config({"source": "digits", "stream": "user"}))


# --- evaluation, resume, memory, cache ---------------------------------------------------------------------------

def test_each_domain_is_scored_on_its_own_test_set():
    result = run_stream(config(ROTATED, epochs=20))
    R = result.test.accuracy_matrix
    assert len(R) == 5 and all(len(row) == 5 for row in R)
    assert R[0][0] > R[0][4] + 0.2  # after domain 0 only, 80-degree digits are far harder than upright ones
    assert result.metrics["test/average_accuracy"] == pytest.approx(
        float(np.mean(result.test.class_accuracy_matrix[-1])))


@pytest.mark.parametrize("kind", ["class_incremental", "domain_incremental", "user", "domain_replay"])
def test_every_stream_kind_resumes_exactly_from_a_stage_state(tmp_path, kind):
    if kind == "user":
        np.savez(tmp_path / "mine.npz", **user_arrays())
        cfg = user_config(tmp_path / "mine.npz")
    elif kind == "class_incremental":
        cfg = config({"source": "digits", "classes_per_stage": 2})
    else:
        cfg = config(ROTATED, rehearsal={"memory_size": 100, "selection": "herding"} if kind == "domain_replay"
                     else None)
    states = {}
    full = run_stream(cfg, on_stage_end=lambda i, m, state: states.__setitem__(i, state))
    resumed = run_stream(cfg, resume_state=states[1])
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix
    assert resumed.test.class_accuracy_matrix == full.test.class_accuracy_matrix


def test_a_memory_on_a_domain_stream_keeps_its_budget_and_every_domain():
    cfg = config(ROTATED, rehearsal={"memory_size": 100, "selection": "random"})
    sizes, held = [], []

    def seen(i, m, state):
        sizes.append(m["memory_size"])
        held.append(state["learner"]["memory"]["x"])
    stream = prepare(cfg).stream
    run_stream(cfg, on_stage_end=seen)
    assert sizes == [100] * 5
    rows = {tuple(r.tolist()) for r in held[-1]}
    for stage in stream:  # the last memory holds samples of every domain, not only the newest one
        assert rows & {tuple(r.tolist()) for r in stage.x_train}


def test_shifted_inputs_are_cached_under_a_key_of_their_own(tmp_path):
    def cnn(data):
        return parse_run_config({"seed": 0, "cache_dir": str(tmp_path), "data": data,
                                 "backbone": {"name": "small_cnn"}, "learner": {"name": "linear"}})
    plain = prepare(cnn({"source": "digits"})).stream
    rotated = prepare(cnn({**ROTATED, "num_domains": 2})).stream
    other = prepare(cnn({**ROTATED, "num_domains": 2, "shift": {"name": "rotation", "step": 45}})).stream
    # domain 1 rotated by 20 and by 45 degrees: two different files, neither the unshifted one
    assert not torch.allclose(rotated[1].x_test, other[1].x_test)
    test_plain = torch.cat([s.x_test for s in plain])
    assert rotated[1].x_test.shape == rotated[0].x_test.shape and not torch.allclose(rotated[1].x_test,
                                                                                      rotated[0].x_test)
    again = prepare(cnn({**ROTATED, "num_domains": 2})).stream  # served from the cache: the same embeddings
    assert torch.equal(again[1].x_test, rotated[1].x_test)
    assert len(list((tmp_path / "features").glob("*.arrow"))) == 2 + 4 + 2  # plain; 2 domains x 2 splits; +1 domain
    assert len(test_plain) == len(rotated[0].x_test)


def test_the_shift_registry_holds_the_documented_shifts():
    assert {"permutation", "drift", "scale", "noise", "rotation", "contrast", "colour", "blur"} <= set(SHIFTS)


# --- the paper claim on domains -----------------------------------------------------------------------------------

def test_rotated_digits_dkvb_with_first_domain_keys_barely_forgets_while_the_mlp_does():
    from conftest import DIGITS_DKVB

    def rotated(learner, **train):
        return config(ROTATED, learner, **{"epochs": 20, "lr": 0.3, **train})
    dkvb = run_stream(rotated(DIGITS_DKVB)).metrics  # keys learned on domain 0 (upright digits) only
    mlp = run_stream(rotated({"name": "mlp"})).metrics
    # measured (seed 0, about 2 s; search_spaces/rotated_digits.yaml's schedule, SGD lr 0.3, 20 epochs per
    # domain): DKVB forgetting 0.027, average accuracy 0.821; MLP forgetting 0.388, accuracy 0.593, the same
    # with 1 or 2 torch threads
    assert dkvb["test/forgetting"] <= 0.05, dkvb
    assert mlp["test/forgetting"] >= 0.3, mlp
    assert dkvb["test/average_accuracy"] > mlp["test/average_accuracy"] + 0.1


def test_imagenet_c_corruptions_grow_in_severity_with_the_domain():
    import imagecorruptions  # noqa: F401 (the dev extra installs it, with the corruptions extra)

    noisy = {"source": "digits", "stream": "domain_incremental", "num_domains": 3,
             "shift": {"name": "corruption", "corruption": "gaussian_noise"}}
    cfg = parse_run_config({"data": noisy})
    shifts = stage_shifts(3, cfg.data.shift, None)
    assert [s.severity for s in shifts] == [0, 1, 2]
    x = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    out = [s(x) for s in shifts]
    assert torch.equal(out[0], x) and torch.equal(out[2], shifts[2](x))  # seeded: the same domain every run
    change = [(o.float() - x.float()).abs().mean() for o in out]
    assert 0 < change[1] < change[2]
    with pytest.raises(ConfigError, match=r"data.shift: corruption needs images of at least 32 x 32 pixels"):
        preflight(cfg)  # digits are 8 x 8


def test_digits_32_are_the_digits_resampled_and_take_the_corruptions():
    import imagecorruptions  # noqa: F401
    from torch.nn.functional import interpolate

    from orchestrator.config import load_experiment

    small, big = load_source(DataConfig(source="digits")), load_source(DataConfig(source="digits_32"))
    assert big.x_train.shape[1:] == (1, 32, 32) and torch.equal(big.y_train, small.y_train)
    assert torch.equal(big.y_test, small.y_test)  # the same split
    # the same images: each one, shrunk back to 8 x 8, is nearer its own source digit than any other
    back = interpolate(big.x_train[:50], size=(8, 8), mode="area").flatten(1)
    assert torch.equal(torch.cdist(back, small.x_train[:50].flatten(1)).argmin(1), torch.arange(50))
    # search_spaces/corrupted_digits.yaml: clean first domain, frost of growing severity after it
    base = load_experiment("search_spaces/corrupted_digits.yaml", ["data.num_domains=3"]).base
    assert (base.data.source, base.data.shift.corruption) == ("digits_32", "frost")
    tests = [s.x_test for s in prepare(base).stream]
    assert torch.equal(tests[0], big.x_test.flatten(1))  # identity backbone: domain 0 is the clean pixels
    change = [float((t - tests[0]).abs().mean()) for t in tests]
    assert 0 < change[1] < change[2]


# --- image_folder with one folder per domain ------------------------------------------------------------------------

DOMAINS = ("sketch", "photo", "art")  # written in this order; sorted, the stages are art, photo, sketch
CLASSES = ("cat", "dog")


def write_domains(root, domains=DOMAINS, classes=CLASSES, per_class=6):
    """root/<domain>/<class>/<i>.png: solid 4 x 4 images whose red says the domain (40 + 60 d for the d-th domain
    written), green the class (100 c) and blue the image (i): every pixel tells where it came from."""
    from PIL import Image

    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            (root / domain / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (4, 4), (40 + 60 * d, 100 * c, i)).save(root / domain / name / f"{i}.png")
    return root


def folder_config(root, **over):
    return config({"source": "image_folder", "root": str(root), "image_size": 4, "stream": "user", **over})


def red(x: torch.Tensor) -> set[int]:
    """The red values of flattened (identity backbone) images: the domain codes they came from."""
    return set(torch.round(x[:, 0] * 255).long().tolist())


@pytest.mark.parametrize("order", [None, ["photo", "sketch", "art"]])
def test_image_folder_domains_are_one_stage_each_in_the_stated_order(tmp_path, order):
    root = write_domains(tmp_path / "pics")
    stream = prepare(folder_config(root, **({"domains": order} if order else {}))).stream
    names = order or sorted(DOMAINS)
    code = {name: 40 + 60 * DOMAINS.index(name) for name in DOMAINS}
    assert len(stream) == 3 and stream.axis == "domain"
    for stage, name in zip(stream, names):
        assert stage.classes == (0, 1)
        for x, y in ((stage.x_train, stage.y_train), (stage.x_val, stage.y_val), (stage.x_test, stage.y_test)):
            assert red(x) == {code[name]}  # from its own domain folder only
            assert set(y.tolist()) == {0, 1}  # every class in every stage
            # the label is the class folder's: green 100 c for class c
            assert torch.equal(torch.round(x[:, 16] * 255).long(), 100 * y)
        # the split is made within the domain: its 12 images, stratified, 4 of them (2 per class) for the test set
        assert len(stage.y_train) + len(stage.y_val) == 8 and torch.bincount(stage.y_test).tolist() == [2, 2]
    raw = load_source(DataConfig(source="image_folder", root=str(root), image_size=4, stream="user"))
    assert raw.class_names == list(CLASSES) and raw.d_train is not None


def test_an_image_folder_domain_stream_resumes_exactly_from_a_stage_state(tmp_path):
    cfg = folder_config(write_domains(tmp_path / "pics"))
    states = {}
    full = run_stream(cfg, on_stage_end=lambda i, m, state: states.__setitem__(i, state))
    resumed = run_stream(cfg, resume_state=states[1])
    assert len(full.test.accuracy_matrix) == 3 and full.protocol["axis"] == "domain"
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix
    assert resumed.test.class_accuracy_matrix == full.test.class_accuracy_matrix


def _loose_image(root):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(root / "stray.png")


def _empty_domain(root):
    for c in CLASSES:
        (root / "blank" / c).mkdir(parents=True)


def _bare_domain(root):
    (root / "blank").mkdir()


def _class_beside_domains(root):
    from PIL import Image
    (root / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(root / "cat" / "0.png")


def _differing_classes(root):
    import shutil
    shutil.copytree(root / "photo" / "dog", root / "photo" / "fox")
    shutil.rmtree(root / "photo" / "cat")


@pytest.mark.parametrize("change,match", [
    (_loose_image, r"pics mixes domain folders \(art, photo, sketch\) with image file\(s\) \(stray.png, ...\) "
                   r"directly in it; accepted: root/<domain>/<class>/<image>"),
    (_class_beside_domains, r"pics mixes domain folders \(art, photo, sketch\) with class folder\(s\) with images "
                            r"\(cat, ...\)"),
    (_empty_domain, r"domain folder .*pics/blank holds no images; accepted: root/<domain>/<class>/<image>"),
    (_bare_domain, r"domain folder .*pics/blank holds no images"),
    (_differing_classes, r"domain folder .*pics/photo lacks cat; has fox besides the classes of .*pics/art "
                         r"\(cat, dog\); accepted: the same class folders in every domain"),
])
def test_bad_domain_folders_are_one_line(tmp_path, change, match):
    root = write_domains(tmp_path / "pics")
    change(root)
    with pytest.raises(DataError, match=r"^data.root: .*" + match) as e:
        preflight(folder_config(root))
    assert "\n" not in str(e.value)


def test_a_user_stream_on_a_plain_image_folder_says_which_layout_is_accepted(tmp_path):
    root = write_domains(tmp_path / "pics", domains=("",))  # root/<class>/<image>: no domain level
    with pytest.raises(DataError, match=r"^data.root: .*pics holds class folders directly \(no domain level\), so "
                                        r"its images have no stages; accepted with data.stream: user and "
                                        r"image_folder: root/<domain>/<class>/<image>, one folder per domain"):
        preflight(folder_config(root))
    assert prepare(config({"source": "image_folder", "root": str(root), "image_size": 4})).stream  # as before
    with pytest.raises(DataError, match=r"^data.domains: .*pics holds class folders directly"):
        preflight(folder_config(root, domains=["photo"]))


@pytest.mark.parametrize("domains,match", [
    (["photo", "photo"], r"data.domains: 'photo' is listed twice"),
    (["photo", "clay"], r"data.domains: 'clay' is not a domain folder of .*pics; accepted: art, photo, sketch"),
])
def test_bad_domain_lists_are_one_line(tmp_path, domains, match):
    with pytest.raises(DataError, match=match):
        preflight(folder_config(write_domains(tmp_path / "pics"), domains=domains))


def test_domains_belong_to_image_folder_only():
    with pytest.raises(ConfigError, match=r"data.domains: names the domain folders of an image_folder root; "
                                          r"data.source is digits"):
        config({"source": "digits", "domains": ["a"]})


def test_other_streams_pool_the_domain_folders(tmp_path):
    root = write_domains(tmp_path / "pics")
    stream = prepare(config({"source": "image_folder", "root": str(root), "image_size": 4})).stream
    assert len(stream) == 1 and stream[0].classes == (0, 1)  # class-incremental, 2 classes per stage
    assert red(torch.cat([stream[0].x_train, stream[0].x_val, stream[0].x_test])) == {40, 100, 160}
    assert len(stream[0].y_test) == 12  # each domain's own split, pooled
