"""The nearest-key search: exact against a brute-force reference, its tie rule, masks, candidate reuse."""
import logging

import pytest
import torch

from workloads import keysearch, score_kernel
from workloads.keysearch import answer_from_candidates, nearest_keys


@pytest.fixture(params=["kernel", "bmm"])
def path(request, monkeypatch):
    """Each search test on both CPU paths: the compiled score kernel, and bmm tiles (its fallback)."""
    if request.param == "bmm":
        monkeypatch.setattr(score_kernel, "kernels", lambda dim: None)
    return request.param


def reference(z, keys, k, allowed=None):
    """Every distance in float64, masked keys at +inf, then a stable sort: ties go to the lowest index."""
    dist = ((z.double().unsqueeze(2) - keys.double().unsqueeze(0)) ** 2).sum(-1)  # (B, C, K)
    if allowed is not None:
        dist = dist.masked_fill(~allowed.unsqueeze(0), float("inf"))
    return dist.sort(dim=-1, stable=True).indices[..., :k]


def grid(gen, *shape):
    """Values on a coarse grid (halves in [-1.5, 1.5]): float32 arithmetic is exact and equal distances abound."""
    return torch.randint(-3, 4, shape, generator=gen).float() / 2


def masks(gen, c, k):
    """A random mask, plus a codebook with no allowed key and one with a single allowed key (k > 1: fewer than k)."""
    allowed = torch.rand(c, k, generator=gen) < 0.3
    allowed[0] = False
    allowed[1] = False
    allowed[1, k // 2] = True
    return allowed


# (257, 2, 4096, 14): the paper's codebooks, inputs not a whole number of lanes; (40, 2, 64, 30): d_k + 1 above
# score_kernel.MAX_DIM, so bmm on both paths
@pytest.mark.parametrize("shape", [(300, 5, 64, 3), (70, 3, 100, 4), (257, 2, 4096, 14), (40, 2, 64, 30)])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_search_matches_brute_force_with_ties_by_lowest_index(shape, k, path):
    gen = torch.Generator().manual_seed(k)
    b, c, num_keys, d = shape
    z, keys = grid(gen, b, c, d), grid(gen, c, num_keys, d)
    assert torch.equal(nearest_keys(z, keys, k), reference(z, keys, k))
    allowed = masks(gen, c, num_keys)
    assert torch.equal(nearest_keys(z, keys, k, allowed), reference(z, keys, k, allowed))


@pytest.mark.parametrize("k", [1, 4])
def test_search_matches_brute_force_on_continuous_inputs(k, path):
    gen = torch.Generator().manual_seed(1)
    z, keys = torch.randn(500, 4, 8, generator=gen), torch.randn(4, 512, 8, generator=gen)
    assert torch.equal(nearest_keys(z, keys, k), reference(z, keys, k))


@pytest.mark.parametrize("num_keys", [4096, 100])  # key blocks of 64, and no block size that divides K
def test_both_top1_reductions_pick_the_first_minimum(num_keys):
    # the compiled one (float32 on the CPU) and the torch one (any other device or dtype)
    gen = torch.Generator().manual_seed(num_keys)
    tile = torch.randint(0, 5, (3, num_keys, 70), generator=gen).float()  # ties everywhere
    expected = tile.double().sort(dim=1, stable=True).indices[:, 0]
    assert torch.equal(keysearch._first_min(tile), expected)
    assert torch.equal(keysearch._first_min(tile.double()), expected)


@pytest.mark.parametrize("num_keys,k", [(4096, 16), (100, 3), (40, 40)])
def test_both_top_k_reductions_rank_by_score_then_index(num_keys, k):
    # the compiled one (float32 on the CPU) and the torch one (any other device or dtype); masked keys +inf
    gen = torch.Generator().manual_seed(num_keys + k)
    tile = torch.randint(0, 5, (3, num_keys, 70), generator=gen).float()  # ties everywhere
    tile[:, torch.rand(num_keys, generator=gen) < 0.5] = float("inf")
    tile[1, : num_keys - 2] = float("inf")  # head 1: two finite keys, then +inf keys by index
    expected = tile.double().sort(dim=1, stable=True).indices[:, :k].transpose(1, 2)
    assert torch.equal(keysearch._first_k(tile, k), expected)
    assert torch.equal(keysearch._first_k(tile.double(), k), expected)


def test_duplicate_keys_go_to_the_lowest_index_and_masked_keys_come_last(path):
    keys = torch.zeros(1, 10, 2)
    keys[0, 3] = keys[0, 7] = keys[0, 8] = torch.tensor([1.0, 1.0])  # three copies of the nearest key
    z = torch.ones(2, 1, 2)
    assert nearest_keys(z, keys, 1)[:, 0, 0].tolist() == [3, 3]
    assert nearest_keys(z, keys, 4)[0, 0].tolist() == [3, 7, 8, 0]  # then the equidistant zeros, lowest first
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, 8] = allowed[0, 5] = True
    # the allowed keys in distance order, then masked keys by index
    assert nearest_keys(z, keys, 4, allowed)[0, 0].tolist() == [8, 5, 0, 1]


def test_tiny_tiles_give_the_same_indices(monkeypatch, path):
    gen = torch.Generator().manual_seed(2)
    z, keys = grid(gen, 50, 6, 3), grid(gen, 6, 48, 3)
    allowed = masks(gen, 6, 48)
    whole = [nearest_keys(z, keys, k, allowed) for k in (1, 5)]
    monkeypatch.setattr("workloads.keysearch.TILE_FLOATS", {"cpu": 48 * 7, "cuda": 48 * 7})  # 1 head x 7 samples
    tiled = [nearest_keys(z, keys, k, allowed) for k in (1, 5)]
    assert all(torch.equal(a, b) for a, b in zip(whole, tiled))


@pytest.mark.parametrize("k", [1, 4])
def test_heads_searched_in_parts_give_the_one_thread_answer(monkeypatch, k, path):
    # tiles of 1 head (7 samples): 5 head tiles split 2 + 3 over two parts, each part on one torch thread
    gen = torch.Generator().manual_seed(6)
    z, keys = grid(gen, 40, 5, 3), grid(gen, 5, 48, 3)
    allowed = masks(gen, 5, 48)
    monkeypatch.setattr("workloads.keysearch.TILE_FLOATS", {"cpu": 48 * 7, "cuda": 48 * 7})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = [nearest_keys(z, keys, k), nearest_keys(z, keys, k, allowed)]
        torch.set_num_threads(2)
        parts = [nearest_keys(z, keys, k), nearest_keys(z, keys, k, allowed)]
        assert torch.get_num_threads() == 2  # the parts' one thread each does not outlive the call
    finally:
        torch.set_num_threads(before)
    assert torch.equal(parts[0], serial[0]) and torch.equal(parts[1], serial[1])
    assert torch.equal(parts[0], reference(z, keys, k)) and torch.equal(parts[1], reference(z, keys, k, allowed))


@pytest.mark.parametrize("k", [1, 3])
def test_candidates_answer_any_mask_exactly(k, path):
    gen = torch.Generator().manual_seed(3)
    for z, keys in [(grid(gen, 200, 4, 3), grid(gen, 4, 96, 3)),
                    (torch.randn(200, 4, 5, generator=gen), torch.randn(4, 96, 5, generator=gen))]:
        cand = nearest_keys(z, keys, 8).to(torch.int16)
        for density in (1.0, 0.7, 0.2, 0.02):  # low densities mask every candidate of many pairs: full search
            allowed = torch.rand(4, 96, generator=gen) < density
            assert torch.equal(answer_from_candidates(cand, z, keys, k, allowed), nearest_keys(z, keys, k, allowed))
        assert torch.equal(answer_from_candidates(cand, z, keys, k), nearest_keys(z, keys, k))


def test_kernel_answers_do_not_depend_on_the_other_inputs_of_their_block():
    # what makes top-1, top-m candidates and masked searches agree: one input's answer is the same whichever lane
    # or block it is searched in, and top-1 is top-k's first
    gen = torch.Generator().manual_seed(9)
    kernel = score_kernel.kernels(9)
    w = kernel.lanes
    ka = keysearch.augmented_keys(torch.randn(1, 300, 8, generator=gen))[0]
    z = torch.randn(9, 3 * w, generator=gen)
    z[8] = 1.0
    blocked = torch.rand(300, generator=gen) < 0.4
    order = torch.randperm(3 * w, generator=gen)
    moved = z[:, order].contiguous()
    for mask in (None, blocked):
        top1, moved1 = torch.empty(3 * w, dtype=torch.long), torch.empty(3 * w, dtype=torch.long)
        topk, movedk = torch.empty(3 * w, 5, dtype=torch.long), torch.empty(3 * w, 5, dtype=torch.long)
        kernel.top1(ka, z, mask, top1)
        kernel.top1(ka, moved, mask, moved1)
        kernel.topk(ka, z, mask, topk, torch.empty(w, 5))
        kernel.topk(ka, moved, mask, movedk, torch.empty(w, 5))
        assert torch.equal(moved1, top1[order]) and torch.equal(movedk, topk[order])
        assert torch.equal(topk[:, 0], top1)
        scores = (ka.double() @ z.double()).masked_fill(blocked.unsqueeze(1) if mask is not None else
                                                          torch.zeros(300, 1, dtype=torch.bool), float("inf"))
        assert torch.equal(topk, scores.sort(dim=0, stable=True).indices[:5].t())
    only = torch.ones(300, dtype=torch.bool)
    only[[7, 250]] = False  # two keys allowed: the kernel ranks those, and leaves -1 for keysearch to fill
    few = torch.empty(3 * w, 5, dtype=torch.long)
    kernel.topk(ka, z, only, few, torch.empty(w, 5))
    assert bool((few[:, 2:] == -1).all()) and set(few[0, :2].tolist()) == {7, 250}


def test_the_kernel_refuses_tensors_of_another_shape_or_layout():
    kernel = score_kernel.kernels(9)
    w = kernel.lanes
    ka, z, out = torch.zeros(30, 9), torch.zeros(9, w), torch.zeros(w, dtype=torch.long)
    kernel.top1(ka, z, None, out)
    for bad in [(torch.zeros(30, 8), z, out), (ka, torch.zeros(9, w + 1), out), (ka, z, torch.zeros(w)),
                (ka.t().contiguous().t(), z, out), (ka, z, torch.zeros(w - 1, dtype=torch.long))]:
        with pytest.raises(ValueError, match="score_kernel.top1"):
            kernel.top1(bad[0], bad[1], None, bad[2])
    with pytest.raises(ValueError, match="score_kernel.top1"):
        kernel.top1(ka, z, torch.zeros(29, dtype=torch.bool), out)


def test_a_kernel_that_cannot_be_compiled_leaves_the_bmm_path(monkeypatch, caplog):
    def no_compiler(dim):
        raise RuntimeError("no target for this CPU")

    monkeypatch.setattr(score_kernel, "Kernels", no_compiler)
    monkeypatch.setattr(score_kernel, "_kernels", {})
    gen = torch.Generator().manual_seed(10)
    z, keys = grid(gen, 60, 3, 5), grid(gen, 3, 80, 5)
    with caplog.at_level(logging.WARNING, logger="workloads.score_kernel"):
        assert torch.equal(nearest_keys(z, keys, 2), reference(z, keys, 2))
        assert torch.equal(nearest_keys(z, keys, 1), reference(z, keys, 1))
    warnings = [r for r in caplog.records if "no compiled score kernel" in r.getMessage()]
    assert len(warnings) == 1 and "no target for this CPU" in warnings[0].getMessage()


def test_k_beyond_the_codebook_is_refused():
    with pytest.raises(ValueError, match="k must lie in"):
        nearest_keys(torch.zeros(2, 1, 3), torch.zeros(1, 4, 3), 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("k", [1, 3])
def test_search_on_cuda_matches_the_reference(k):
    gen = torch.Generator().manual_seed(4)
    z, keys = grid(gen, 300, 5, 4), grid(gen, 5, 256, 4)
    allowed = masks(gen, 5, 256)
    got = nearest_keys(z.cuda(), keys.cuda(), k, allowed.cuda()).cpu()
    assert torch.equal(got, reference(z, keys, k, allowed))


def test_keys_changed_in_place_are_searched_as_they_are_now():
    gen = torch.Generator().manual_seed(5)
    z, keys = grid(gen, 40, 3, 4), grid(gen, 3, 32, 4)
    before = nearest_keys(z, keys, 2)
    keys.mul_(-1.0)  # the same tensor, new values: nothing computed for the old values may be reused
    assert torch.equal(nearest_keys(z, keys, 2), reference(z, keys, 2))
    assert not torch.equal(nearest_keys(z, keys, 2), before)


def test_augmented_keys_are_minus_twice_the_key_and_its_squared_norm_summed_in_order():
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(3, 50, 6, generator=gen)
    expected_norm = keys[..., 0] * keys[..., 0]
    for j in range(1, 6):
        expected_norm = expected_norm + keys[..., j] * keys[..., j]  # float32, dimension 0 first
    fresh = keysearch.augmented_keys(keys)
    assert torch.equal(fresh[..., :6], -2 * keys) and torch.equal(fresh[..., 6], expected_norm)
    out = torch.full((3, 50, 7), float("nan"))
    assert keysearch.augmented_keys(keys, out=out) is out and torch.equal(out, fresh)
    assert torch.allclose(keysearch.augmented_keys(keys.double())[..., 6], expected_norm.double())  # torch path
    assert torch.equal(keysearch.augmented_keys(keys.clone().requires_grad_()), fresh)  # keys a user trains


def test_keys_changed_in_place_again_and_again_reuse_one_augmented_buffer():
    gen = torch.Generator().manual_seed(8)
    z, keys = torch.randn(30, 2, 5, generator=gen), torch.randn(2, 40, 5, generator=gen)
    first = keysearch._augmented(keys, torch.float32)
    for _ in range(3):
        keys.add_(torch.randn(2, 40, 5, generator=gen))  # key learning's batches: new values, the same tensor
        assert torch.equal(nearest_keys(z, keys, 3), reference(z, keys, 3))
        assert keysearch._augmented(keys, torch.float32) is first  # written again, not allocated again
