"""An epoch's batches: gathered a few at a time, they are the batches indexing sample by sample would give."""
import pytest
import torch

from workloads import distributed
from workloads.distributed import shard_batches, shard_epoch


@pytest.mark.parametrize("n,batch,size", [(103, 10, 1), (103, 10, 3), (64, 64, 2), (50, 200, 1), (7, 2, 2)])
def test_epoch_batches_are_the_per_batch_rows_of_every_process(monkeypatch, n, batch, size):
    # rows of 3 floats: a view of a gathered chunk would often start off a 64-byte boundary
    x, y = torch.randn(n, 3), torch.arange(n)
    monkeypatch.setattr(distributed, "GATHER_BYTES", 3 * batch * 16)  # several gathers per epoch
    for rank in range(size):
        monkeypatch.setattr(distributed, "world", lambda: (rank, size))
        old, new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        expected = [(full, x[mine], y[mine]) for full, mine in shard_batches(n, min(batch, n), old)]
        got = list(shard_epoch((x, y), min(batch, n), new))
        assert len(got) == len(expected)
        for (full, xs, ys), (g_full, (g_x, g_y)) in zip(expected, got):
            assert torch.equal(full, g_full) and torch.equal(xs, g_x) and torch.equal(ys, g_y)
            assert g_x.is_contiguous() and g_x.data_ptr() % 64 == 0  # as a freshly gathered batch
        # the generator is left where per-batch indexing left it: later draws (replay) are unchanged
        assert torch.equal(torch.rand(4, generator=old), torch.rand(4, generator=new))
