"""The compiled CPU step (workloads/sparse_step.py) against the torch step it replaces on the CPU."""
import pytest
import torch

from workloads import sparse_step
from workloads.bottleneck import KeyValueBottleneck, sparse_sgd_step, torch_sparse_sgd_step


def _batch(seed: int, b: int = 40, c: int = 12, num_keys: int = 30, k: int = 1, d: int = 5):
    """Values (C, K, d), selections (b, C, k) with many repeats (classes prefer some keys), labels (b,)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(c, num_keys, d, generator=g)
    y = torch.randint(d, (b,), generator=g)
    preferred = torch.rand(d, c, num_keys, generator=g).argsort(-1)[..., :k]  # k distinct keys per class
    own = torch.rand(b, c, num_keys, generator=g).argsort(-1)[..., :k]
    idx = torch.where(torch.rand(b, c, 1, generator=g) < 0.5, preferred[y], own)
    return values, idx, y


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("clip", [None, 1e-3, 10.0])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_compiled_step_gives_the_torch_steps_values_and_loss(k, clip, dtype):
    values, idx, y = _batch(0, k=k)
    compiled, reference = values.clone(), values.clone()
    for step in range(3):  # a few steps: each reads what the last wrote
        loss = sparse_step.sparse_sgd_step(compiled, idx.to(dtype), y, 0.5, clip, 0.1)
        expected = torch_sparse_sgd_step(reference, idx, y, 0.5, clip, 0.1)
        assert loss == pytest.approx(expected, rel=1e-6)
    moved = (reference - values).abs().max()
    assert moved > 0
    torch.testing.assert_close(compiled, reference, rtol=1e-6, atol=1e-6 * float(moved))  # float32 rounding
    untouched = torch.ones(values.shape[:2], dtype=torch.bool)
    untouched[torch.arange(values.shape[0]).view(1, -1, 1), idx] = False
    assert torch.equal(compiled[untouched], values[untouched])  # rows no sample selected keep every bit


@pytest.mark.parametrize("d", [5, 10])
@pytest.mark.parametrize("k,clip", [(1, None), (3, 1e-3)])
def test_rows_padded_to_cache_lines_give_the_contiguous_tables_values_bit_for_bit(d, k, clip):
    from workloads.bottleneck import value_table

    values, idx, y = _batch(6, k=k, d=d)
    padded = value_table(values)
    assert padded.stride(1) == {5: 8, 10: 16}[d] and torch.equal(padded, values)
    for step in (sparse_step.sparse_sgd_step, torch_sparse_sgd_step):  # compiled, and torch (other devices')
        contiguous, table = values.clone(), value_table(values)
        usage, padded_usage = (torch.zeros(values.shape[:2], dtype=torch.long) for _ in range(2))
        for _ in range(3):
            extra = {"usage": usage} if step is sparse_step.sparse_sgd_step else {}
            loss = step(contiguous, idx, y, 0.5, clip, 0.1, **extra)
            extra = {"usage": padded_usage} if step is sparse_step.sparse_sgd_step else {}
            assert step(table, idx, y, 0.5, clip, 0.1, **extra) == loss
        assert not torch.equal(contiguous, values) and torch.equal(table, contiguous), step.__name__
        assert torch.equal(usage, padded_usage)
        rows = table.as_strided((*table.shape[:2], table.stride(1)), table.stride())  # each row with its padding
        assert not rows[..., d:].any()  # the padding is never written


def test_clipping_acts_where_the_norm_exceeds_the_limit_and_only_there():
    values, idx, y = _batch(1)
    # the gradient's norm, from the torch step with clipping off: lr 1 moves each row by its gradient
    probe = values.clone()
    torch_sparse_sgd_step(probe, idx, y, 1.0, None, 0.0)
    norm = float((values - probe).norm())
    for clip in (0.5 * norm, 2 * norm):  # acting, then not (the bound may still exceed the limit there)
        compiled, reference = values.clone(), values.clone()
        sparse_step.sparse_sgd_step(compiled, idx, y, 1.0, clip, 0.0)
        torch_sparse_sgd_step(reference, idx, y, 1.0, clip, 0.0)
        torch.testing.assert_close(compiled, reference, rtol=1e-6, atol=1e-6 * norm)
        moved = float((values - compiled).norm())
        assert moved == pytest.approx(min(clip, norm), rel=1e-4)


def test_results_do_not_depend_on_the_thread_count():
    values, idx, y = _batch(2, c=40)
    threads = torch.get_num_threads()
    outcomes = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            table = values.clone()
            losses = [sparse_step.sparse_sgd_step(table, idx, y, 0.3, 1e-3, 0.1) for _ in range(2)]
            outcomes.append((table, losses))
    finally:
        torch.set_num_threads(threads)
    for table, losses in outcomes[1:]:
        assert torch.equal(table, outcomes[0][0]) and losses == outcomes[0][1]


def test_usage_counts_every_selection():
    values, idx, y = _batch(3, k=2)
    usage = torch.full(values.shape[:2], 7, dtype=torch.long)
    sparse_step.sparse_sgd_step(values, idx, y, 0.1, None, 0.0, usage)
    c, num_keys = values.shape[:2]
    flat = (idx + torch.arange(c).view(1, -1, 1) * num_keys).reshape(-1)
    assert torch.equal(usage.view(-1), 7 + torch.bincount(flat, minlength=c * num_keys))


def test_the_bottleneck_counts_usage_the_same_on_either_step():
    _, idx, y = _batch(4, c=6, num_keys=20)
    compiled, fallback = KeyValueBottleneck(16, 6, 20, 4, 5), KeyValueBottleneck(16, 6, 20, 4, 5)
    compiled.sgd_step(idx.int(), y, 0.2, 1.0, 0.1)
    fallback.values.data = fallback.values.data.double()  # not the compiled step's dtype: the torch step
    assert not sparse_step.supports(fallback.values, idx)
    fallback.sgd_step(idx, y, 0.2, 1.0, 0.1)
    assert torch.equal(compiled.usage, fallback.usage) and int(compiled.usage.sum()) == idx.numel()
    torch.testing.assert_close(compiled.values.data.double(), fallback.values.data, rtol=1e-6, atol=1e-6)


def test_the_public_step_takes_the_compiled_path_on_the_cpu_and_torch_elsewhere():
    values, idx, y = _batch(5)
    assert sparse_step.supports(values, idx)
    assert not sparse_step.supports(values.double(), idx)
    assert not sparse_step.supports(values.transpose(0, 1), idx)  # not contiguous
    a, b = values.clone(), values.double()
    sparse_sgd_step(a, idx, y, 0.4, 1.0, 0.1)
    sparse_sgd_step(b, idx, y, 0.4, 1.0, 0.1)
    torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["key", "negative key", "label"])
def test_an_index_out_of_range_is_refused_before_any_value_changes(bad):
    values, idx, y = _batch(6)
    idx, y = idx.clone(), y.clone()
    if bad == "key":
        idx[3, 2, 0] = values.shape[1]
    elif bad == "negative key":
        idx[0, 0, 0] = -1
    else:
        y[5] = values.shape[2]
    table = values.clone()
    with pytest.raises(IndexError, match="outside"):
        sparse_step.sparse_sgd_step(table, idx, y, 0.5, 1.0, 0.1)
    assert torch.equal(table, values)
