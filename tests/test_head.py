"""The head's own decode (anchor points, DFL expectation, distances to boxes) against hand-computed boxes and,
where ultralytics is installed, against its make_anchors / dist2bbox; the adapter's signature check."""

import math
import threading

import pytest
import torch

from yolo_mobile import _ultralytics
from yolo_mobile.head import DetectHead, anchor_points, distances_to_boxes


def test_anchor_points_by_hand():
    maps = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 2)]  # strides 8 and 16 of a 16x24 input
    points, strides = anchor_points(maps, [8, 16])
    assert points.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5],
                               [0.5, 0.5], [1.5, 0.5]]
    assert strides.flatten().tolist() == [8] * 6 + [16] * 2


def test_distances_to_boxes_by_hand():
    points = torch.tensor([[2.0, 3.0]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # left, top, right, bottom
    assert distances_to_boxes(distances, points, xywh=False).tolist() == [[1.0, 1.0, 5.0, 7.0]]
    assert distances_to_boxes(distances, points, xywh=True).tolist() == [[3.0, 4.0, 4.0, 6.0]]


def one_hot_logits(bins: list[int], reg_max: int) -> torch.Tensor:
    """Box logits whose softmax puts (almost) all weight on ``bins`` = left, top, right, bottom."""
    logits = torch.full((4, reg_max), -50.0)
    for side, b in enumerate(bins):
        logits[side, b] = 50.0
    return logits.flatten()


def test_decode_of_a_known_map_gives_hand_computed_boxes():
    """A 64x64 input: strides 8, 16, 32 give 8x8, 4x4, 2x2 cells. Two cells get known distances and classes."""
    nc, reg_max = 2, 16
    head = DetectHead(nc, [8, 8, 8], [8, 16, 32], reg_max=reg_max).eval()
    maps = [torch.zeros(1, 4 * reg_max + nc, n, n) for n in (8, 4, 2)]
    for m in maps:  # every other cell: zero distances, class logits -9
        m[0, : 4 * reg_max] = one_hot_logits([0, 0, 0, 0], reg_max)[:, None, None]
        m[0, 4 * reg_max:] = -9.0
    # stride 8, row 2, column 5: centre (5.5, 2.5) cells = (44, 20) px; distances 1, 2, 3, 4 cells
    maps[0][0, : 4 * reg_max, 2, 5] = one_hot_logits([1, 2, 3, 4], reg_max)
    maps[0][0, 4 * reg_max + 1, 2, 5] = 3.0
    # stride 32, row 1, column 0: centre (0.5, 1.5) cells = (16, 48) px; distances 0, 1, 1, 0 cells
    maps[2][0, : 4 * reg_max, 1, 0] = one_hot_logits([0, 1, 1, 0], reg_max)
    maps[2][0, 4 * reg_max, 1, 0] = 0.0
    out = head.decode(maps)  # (1, 4 + nc, 64 + 16 + 4)
    assert out.shape == (1, 4 + nc, 84)
    first = 2 * 8 + 5
    # x1 = 44 - 8 = 36, y1 = 20 - 16 = 4, x2 = 44 + 24 = 68, y2 = 20 + 32 = 52 -> cx 52, cy 28, w 32, h 48
    torch.testing.assert_close(out[0, :4, first], torch.tensor([52.0, 28.0, 32.0, 48.0]))
    torch.testing.assert_close(out[0, 4:, first], torch.tensor([1 / (1 + math.exp(9)), 1 / (1 + math.exp(-3))]))
    last = 64 + 16 + 1 * 2 + 0
    # x1 = 16, y1 = 48 - 32, x2 = 16 + 32, y2 = 48 -> cx 32, cy 32, w 32, h 32
    torch.testing.assert_close(out[0, :4, last], torch.tensor([32.0, 32.0, 32.0, 32.0]))
    torch.testing.assert_close(out[0, 4, last], torch.tensor(0.5))
    # a cell with zero distances decodes to a point at its centre: stride 16, row 3, column 1 -> (24, 56)
    torch.testing.assert_close(out[0, :4, 64 + 3 * 4 + 1], torch.tensor([24.0, 56.0, 0.0, 0.0]))


def test_anchor_cache_is_read_once_and_follows_the_input_size():
    head = DetectHead(1, [8, 8, 8], [8, 16, 32]).eval()
    small = [torch.zeros(1, 1, n, n) for n in (4, 2, 1)]
    large = [torch.zeros(1, 1, n, n) for n in (8, 4, 2)]
    assert head.anchors(small)[0].shape == (21, 2)
    assert head.anchors(large)[0].shape == (84, 2)
    errors = []

    def run(maps, n):  # two threads alternate sizes on one head: each must get its own size's anchors
        for _ in range(200):
            points, strides = head.anchors(maps)
            if points.shape[0] != n or strides.shape[0] != n:
                errors.append((n, points.shape[0], strides.shape[0]))

    threads = [threading.Thread(target=run, args=(small, 21)), threading.Thread(target=run, args=(large, 84))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_decode_matches_ultralytics():
    tal = pytest.importorskip("ultralytics.utils.tal")
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 8, h, w, generator=g) for h, w in ((12, 20), (6, 10), (3, 5))]
    ours = anchor_points(maps, [8, 16, 32])
    theirs = tal.make_anchors(maps, [8, 16, 32], 0.5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    distances = torch.rand(2, 4, ours[0].shape[0], generator=g) * 10
    points = ours[0].T.unsqueeze(0)
    for xywh in (True, False):
        torch.testing.assert_close(distances_to_boxes(distances, points, xywh=xywh, dim=1),
                                   tal.dist2bbox(distances, points, xywh=xywh, dim=1), rtol=0, atol=1e-6)


def test_adapter_names_a_keyword_the_installed_ultralytics_does_not_take(monkeypatch):
    pytest.importorskip("ultralytics")
    assert _ultralytics.missing_keywords(lambda pd_scores, *, mask_gt: None, ("pd_scores", "mask_gt")) == []
    assert _ultralytics.missing_keywords(lambda scores, mask_gt: None, ("pd_scores", "mask_gt")) == ["pd_scores"]
    _ultralytics.load.cache_clear()
    changed = (*_ultralytics.CALLS[:2], ("ultralytics.utils.loss", "BboxLoss", ("reg_max", "iou_type")))
    monkeypatch.setattr(_ultralytics, "CALLS", changed)
    try:
        with pytest.raises(ImportError, match=r"ultralytics 8\.[\d.]+: ultralytics\.utils\.loss\.BboxLoss does not "
                                              r"take iou_type; yolo-mobile needs 'ultralytics>=8\.4\.0,<8\.5'"):
            _ultralytics.load()
    finally:
        _ultralytics.load.cache_clear()


def test_training_loss_is_the_same_with_ultralytics_decode(monkeypatch):
    """The loss reads our anchors and box decode; swapping in ultralytics' make_anchors/dist2bbox changes nothing."""
    tal = pytest.importorskip("ultralytics.utils.tal")
    from yolo_mobile import loss as loss_module
    from yolo_mobile.engine.memory import random_targets

    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 4 * 16 + 3, n, n, generator=g) for n in (8, 4, 2)]
    targets = random_targets(2, 64, 64, nc=3, per_image=4, seed=1)
    criterion = loss_module.DetectionLoss(nc=3, strides=[8, 16, 32])
    ours = criterion(maps, targets)
    monkeypatch.setattr(loss_module, "anchor_points", lambda m, s: tal.make_anchors(m, s, 0.5))
    monkeypatch.setattr(loss_module, "distances_to_boxes", tal.dist2bbox)
    theirs = criterion(maps, targets)
    assert ours[1].abs().min() > 0  # every term (box, cls, dfl) has assigned anchors to work on
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)
