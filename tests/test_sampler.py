"""MultiScaleBatchSampler invariants (the contract in the training issue)."""

import pytest

from yolo_mobile.datasets.sampler import MultiScaleBatchSampler


def epoch_batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sizes_divisible_and_pixels_constant():
    s = MultiScaleBatchSampler(1000, 640, 16, min_scale=0.5, max_scale=1.5, n_scales=5, stride=32)
    # by hand: 16 images of 640^2 = 6,553,600 pixels a batch; at 480^2 that is 28.4 images, at 960^2 7.1
    assert s.sizes == [(320, 320, 64), (480, 480, 28), (640, 640, 16), (800, 800, 10), (960, 960, 7)]
    for h, w, b in s.sizes:
        # about the same pixels per batch at every size (integer batch sizes round down by < 1 image)
        assert 640**2 * 16 * (1 - 1 / b) - 1 <= b * h * w <= 640**2 * 16


def test_imgsz_added_when_not_on_the_grid():
    s = MultiScaleBatchSampler(10, 416, 8, min_scale=0.5, max_scale=1.0, n_scales=2)
    assert s.sizes == [(192, 192, 37), (416, 416, 8)]  # 208 rounds to 192; 8 x 416^2 / 192^2 = 37.6 images


def test_every_index_once_and_sizes_honoured():
    s = MultiScaleBatchSampler(203, 320, 8, seed=3)
    batches = epoch_batches(s)
    indices = [i for b in batches for i, _, _ in b]
    assert sorted(indices) == list(range(203))
    for b in batches:
        assert len({(h, w) for _, h, w in b}) == 1  # one size per batch
        h, w = b[0][1:]
        assert len(b) <= s.batch_size_of(h, w)
    assert len(s) == len(batches)
    assert len({b[0][1] for b in batches}) > 1  # several sizes are drawn


def test_deterministic_by_epoch_and_reshuffled():
    a = MultiScaleBatchSampler(100, 320, 8, seed=1)
    b = MultiScaleBatchSampler(100, 320, 8, seed=1)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 1) == epoch_batches(b, 1)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    assert epoch_batches(MultiScaleBatchSampler(100, 320, 8, seed=2), 0) != epoch_batches(a, 0)


@pytest.mark.parametrize(("n", "world"), [(101, 2), (100, 3), (7, 4), (64, 8)])
def test_ddp_shares_disjoint_complete_and_same_sizes(n, world):
    ranks = [MultiScaleBatchSampler(n, 320, 4, seed=5, rank=r, world_size=world) for r in range(world)]
    per_rank = [epoch_batches(s, 2) for s in ranks]
    # the same number of steps and the same size at each step on every rank (DDP stays in lockstep)
    assert len({len(b) for b in per_rank}) == 1
    for step in zip(*per_rank, strict=True):
        assert len({(b[0][1], b[0][2]) for b in step}) == 1
        assert all(len(b) >= 1 for b in step)
    seen = [i for batches in per_rank for b in batches for i, _, _ in b]
    assert sorted(seen) == list(range(n))  # disjoint and complete
    assert all(len(s) == len(b) for s, b in zip(ranks, per_rank, strict=True))


def test_no_shuffle_keeps_order():
    s = MultiScaleBatchSampler(10, 64, 4, min_scale=1, max_scale=1, n_scales=1, shuffle=False)
    assert [[i for i, _, _ in b] for b in s] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert s.sizes == [(64, 64, 4)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="cannot be shared among 4 ranks"):
        MultiScaleBatchSampler(3, 320, 4, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank 2 outside 0\.\.1"):
        MultiScaleBatchSampler(10, 320, 4, rank=2, world_size=2)
