import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import COCO128, make_yolo_dataset, needs_coco128

from yolo_mobile.datasets.labels import LabelError
from yolo_mobile.datasets.letterbox import letterbox, unletterbox_boxes
from yolo_mobile.engine.evaluator import METRIC_KEYS, COCOEvaluator


def gt_as_predictions(ev: COCOEvaluator, jitter: float = 0.0, seed: int = 0):
    """The evaluator's own ground truth as predictions (score 1, or random scores when jittered)."""
    rng = np.random.default_rng(seed)
    by_image = {}
    for a in ev.gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    index = {c: k for k, c in enumerate(ev.category_ids)}
    ids, preds = [], []
    for image_id, im in zip(ev.image_ids, ev.gt["images"], strict=True):
        anns = by_image.get(im["id"], [])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        if jitter:
            boxes = boxes + rng.normal(0, jitter, boxes.shape) * np.repeat(xywh[:, 2:], 2, 1)
        scores = rng.random(len(anns)) if jitter else np.ones(len(anns))
        ids.append(image_id)
        preds.append({"boxes": boxes, "scores": scores, "classes": np.array([index[a["category_id"]] for a in anns])})
    return ids, preds


@needs_coco128
def test_ground_truth_as_predictions_gives_ap_1():
    ev = COCOEvaluator.from_yolo(COCO128 / "coco128.yaml", "val")
    assert len(ev.image_ids) == 128 and ev.image_ids[0] == "000000000139"
    ev.update(*gt_as_predictions(ev))
    r = ev.summarize()
    assert r["map"] == r["map50"] == r["map75"] == 1.0
    assert r["images"] == 128 and r["instances"] == sum(c["instances"] for c in r["per_class"])
    assert all(c["ap"] == pytest.approx(1.0) for c in r["per_class"] if c["instances"])


@needs_coco128
def test_jittered_boxes_match_pycocotools_called_directly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ev = COCOEvaluator.from_yolo(COCO128 / "coco128.yaml", "val")
    ev.update(*gt_as_predictions(ev, jitter=0.08))
    ours = ev.summarize()
    assert 0.2 < ours["map"] < 0.95  # the jitter is visible

    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(ev.gt))
    dets = ev.detections()
    results = [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": r[1:5].tolist(), "score": float(r[5])}
               for r in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        direct = COCOeval(gt, gt.loadRes(results), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    for key, value in zip(METRIC_KEYS, direct.stats, strict=True):
        assert ours[key] == pytest.approx(value, abs=1e-12), key


@needs_coco128
def test_faster_backend_gives_same_numbers():
    pytest.importorskip("faster_coco_eval")
    results = []
    for backend in ("pycocotools", "faster"):
        ev = COCOEvaluator.from_yolo(COCO128 / "coco128.yaml", "val", backend=backend)
        ev.update(*gt_as_predictions(ev, jitter=0.05, seed=3))
        results.append(ev.summarize())
    for key in METRIC_KEYS:
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-4), key


def test_no_predictions_gives_zeros_and_unlabelled_images_count(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a1": "0 0.5 0.5 0.2 0.2\n", "b2": "", "c3": None})
    ev = COCOEvaluator.from_yolo(data, "val")
    assert ev.image_ids == ["a1", "b2", "c3"]
    r = ev.summarize()
    assert r["images"] == 3 and r["instances"] == 1
    assert all(r[k] == 0.0 for k in METRIC_KEYS)
    # a perfect box on the one labelled image, nothing elsewhere: the unlabelled images do not count against it
    ev.update(["a1"], [{"boxes": torch.tensor([[25.6, 19.2, 38.4, 28.8]]), "scores": torch.tensor([0.9]),
                        "classes": torch.tensor([0])}])
    assert ev.summarize()["map50"] == pytest.approx(1.0)


@pytest.mark.parametrize(("text", "message"), [
    ("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.1 0.1\n", r"a1.txt:2: class id 3 outside 0..2"),
    ("0 0.5 0.5 0.2\n", r"a1.txt:1: expected 5 values"),
    ("\n\n0 0.5 zero 0.2 0.2\n", r"a1.txt:3: not a number"),
    ("1 0.5 0.5 1.4 0.2\n", r"a1.txt:1: box .* not normalised"),
])
def test_bad_label_names_file_and_line(tmp_path, text, message):
    data = make_yolo_dataset(tmp_path, {"a1": text, "b2": ""})
    with pytest.raises(LabelError, match=message):
        COCOEvaluator.from_yolo(data, "val")


def test_coco_json_keeps_coco_category_ids(tmp_path):
    gt = {"images": [{"id": 42, "file_name": "x.jpg", "width": 100, "height": 80}],
          "annotations": [{"id": 1, "image_id": 42, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600,
                           "iscrowd": 0}],
          "categories": [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(gt))
    ev = COCOEvaluator.from_coco_json(path)
    assert ev.names == ["one", "three", "seven"] and ev.image_ids == [42]
    ev.update([42], [{"boxes": np.array([[10, 10, 40, 30]]), "scores": np.array([0.8]), "classes": np.array([2])}])
    assert ev.summarize()["map"] == pytest.approx(1.0)
    saved = json.loads(ev.save_json(tmp_path / "pred.json").read_text())
    assert saved == [{"image_id": 42, "category_id": 7, "bbox": [10.0, 10.0, 30.0, 20.0], "score": 0.8}]


def test_save_json_uses_numeric_stems(tmp_path):
    data = make_yolo_dataset(tmp_path, {"000000000139": "1 0.5 0.5 0.5 0.5\n"})
    ev = COCOEvaluator.from_yolo(data, "val")
    ev.update(["000000000139"], [{"boxes": [[16, 12, 48, 36]], "scores": [0.5], "classes": [1]}])
    saved = json.loads(ev.save_json(tmp_path / "p.json").read_text())
    assert saved[0]["image_id"] == 139 and saved[0]["category_id"] == 1 and saved[0]["bbox"] == [16, 12, 32, 24]


def test_unknown_backend_fails_at_once(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a1": ""})
    with pytest.raises(ValueError, match="unknown eval backend 'fast'; valid: pycocotools, faster"):
        COCOEvaluator.from_yolo(data, "val", backend="fast")


@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (333, 500), (100, 1000)])
def test_letterbox_inverse_within_one_pixel(shape):
    h, w = shape
    image = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = int(w * 0.2), int(h * 0.3), int(w * 0.7), int(h * 0.9)
    image[y1:y2, x1:x2] = 255  # the box, drawn
    boxed, info = letterbox(image, (320, 320))
    assert boxed.shape == (320, 320, 3)
    ys, xs = np.nonzero(boxed[..., 0] > 127)  # find it again in the letterboxed image
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    back = unletterbox_boxes(found, info)[0]
    assert (back - torch.tensor([x1, y1, x2, y2])).abs().max() <= 1.0 / min(info.scale) + 1e-6
    # exact arithmetic: a box mapped forward and back is unchanged
    sx, sy = info.scale
    fwd = torch.tensor([[x1 * sx + info.pad[0], y1 * sy + info.pad[1], x2 * sx + info.pad[0], y2 * sy + info.pad[1]]])
    assert torch.allclose(unletterbox_boxes(fwd, info)[0], torch.tensor([x1, y1, x2, y2], dtype=torch.float32),
                          atol=1e-3)
