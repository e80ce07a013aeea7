"""`yolo-mobile val` and the validation loop, end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import COCO128, make_yolo_dataset, needs_coco128

from yolo_mobile import build_model
from yolo_mobile.cli import main
from yolo_mobile.datasets.letterbox import letterbox
from yolo_mobile.engine.evaluator import COCOEvaluator
from yolo_mobile.engine.validate import split_items, validate


class Oracle(torch.nn.Module):
    """Answers each batch, in loader order, with the ground truth of its images placed in letterboxed pixels:
    a perfect model, so the whole chain (letterbox, decode layout, NMS, mapping back, COCO) must give AP 1."""

    def __init__(self, evaluator: COCOEvaluator, items, imgsz: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        nc = len(evaluator.names)
        by_image = {}
        for a in evaluator.gt["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        coco_id = dict(zip(evaluator.image_ids, (im["id"] for im in evaluator.gt["images"]), strict=True))
        sizes = {im["id"]: (im["height"], im["width"]) for im in evaluator.gt["images"]}
        self.answers = []
        for image_id, _ in items:
            cid = coco_id[image_id]
            _, info = letterbox(np.zeros((*sizes[cid], 3), np.uint8), (imgsz, imgsz))
            (sx, sy), (left, top) = info.scale, info.pad
            out = torch.zeros(4 + nc, 8400)
            for j, a in enumerate(by_image.get(cid, [])):
                x, y, w, h = a["bbox"]
                out[:4, j] = torch.tensor([(x + w / 2) * sx + left, (y + h / 2) * sy + top, w * sx, h * sy])
                out[4 + evaluator.category_ids.index(a["category_id"]), j] = 1.0
            self.answers.append(out)

    def forward(self, x):
        batch, self.answers = self.answers[: len(x)], self.answers[len(x):]
        return torch.stack(batch)


@needs_coco128
def test_val_pipeline_with_a_perfect_model_gives_ap_1():
    data = COCO128 / "coco128.yaml"
    ev = COCOEvaluator.from_yolo(data, "val")
    oracle = Oracle(ev, split_items(data, "val", ev), 320)
    # NMS at 0.95: coco128 has 3 pairs of same-class boxes overlapping more than the default 0.7
    r = validate(oracle, data, imgsz=320, batch=16, workers=0, evaluator=ev, progress=False, iou=0.95)
    assert oracle.answers == []  # every image was asked for, once
    assert len(ev.detections()) == r["instances"]
    assert r["map"] == pytest.approx(1.0) and r["map_small"] == pytest.approx(1.0)


def test_val_cli_untrained_model(tmp_path, capsys):
    data = make_yolo_dataset(tmp_path / "ds", {"a1": "0 0.5 0.5 0.4 0.4\n", "b2": "2 0.3 0.3 0.2 0.5\n"})
    rc = main(["val", "--cfg", "yolov5n.yaml", "--data", str(data), "--imgsz", "64", "--batch", "2",
               "--workers", "0", "--project", str(tmp_path / "runs"), "--save-json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "all" in out and "instances" in out
    metrics = json.loads((tmp_path / "runs" / "exp" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["instances"] == 2
    assert (tmp_path / "runs" / "exp" / "predictions.json").is_file()
    assert main(["val", "--cfg", "yolov5n.yaml", "--data", str(data), "--imgsz", "64", "--workers", "0",
                 "--project", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "exp2" / "metrics.json").is_file()  # runs are numbered, never overwritten


def test_val_cli_missing_inputs_fail_before_work(tmp_path, capsys):
    assert main(["val", "--cfg", "yolov5n.yaml", "--data", str(tmp_path / "nope.yaml"),
                 "--project", str(tmp_path / "runs")]) == 2
    assert "nope.yaml: no such data YAML" in capsys.readouterr().err
    data = make_yolo_dataset(tmp_path / "ds", {"a1": ""})
    assert main(["val", "--weights", str(tmp_path / "missing.pt"), "--data", str(data),
                 "--project", str(tmp_path / "runs")]) == 2
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_val_skips_unreadable_image(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a1": "0 0.5 0.5 0.4 0.4\n", "b2": ""})
    ev = COCOEvaluator.from_yolo(data, "val")
    (tmp_path / "images" / "val" / "b2.jpg").write_bytes(b"\xff\xd8 truncated")  # corrupt after the GT was read
    model = build_model("yolov5n.yaml", nc=3)
    r = validate(model, data, imgsz=64, batch=2, workers=0, evaluator=ev, progress=False)
    assert r["skipped_images"] == 1 and r["images"] == 2


def _ddp_worker(rank, world, rdzv, data, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    ev = COCOEvaluator.from_yolo(data, "val")
    rng = np.random.default_rng(rank)
    ids = ev.image_ids[rank::world]
    preds = [{"boxes": [[10, 10, 40, 30]], "scores": [rng.random()], "classes": [0]} for _ in ids]
    ev.update(ids, preds)
    result = ev.summarize()
    if rank == 0:
        out.write_text(json.dumps({"result": result, "n": len(ev.detections())}))
    else:
        assert result == {}
    torch.distributed.destroy_process_group()


def test_ddp_gathers_predictions_from_every_rank(tmp_path):
    labels = {f"im{i}": "0 0.4 0.4 0.5 0.4\n" for i in range(6)}
    data = make_yolo_dataset(tmp_path, labels, sizes={k: (50, 64) for k in labels})
    out = tmp_path / "ddp.json"
    # forked, not spawned: the workers run no torch kernels, and spawn would import torch afresh in each
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, tmp_path / "rdzv", data, out), nprocs=2, join=True,
                                          start_method="fork")
    gathered = json.loads(out.read_text())
    assert gathered["n"] == 6  # rank 0 saw both ranks' predictions

    ev = COCOEvaluator.from_yolo(data, "val")  # the same predictions, in one process
    for rank in range(2):
        rng = np.random.default_rng(rank)
        ids = ev.image_ids[rank::2]
        ev.update(ids, [{"boxes": [[10, 10, 40, 30]], "scores": [rng.random()], "classes": [0]} for _ in ids])
    single = ev.summarize()
    assert gathered["result"]["map"] == pytest.approx(single["map"]) and single["map"] > 0
