"""Every bad input gets one clear line (issue 16): each row is the input, the fragment the message must hold, the
exit code, and the output that must not exist afterwards. Inputs that should work (odd file names, a BOM) or be
skipped and named (a truncated JPEG, a zero-byte image) have their own tests below the table."""

import logging
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from conftest import make_yolo_dataset

from yolo_mobile import build_model
from yolo_mobile.cli import main
from yolo_mobile.config import load_data_config
from yolo_mobile.datasets.detection import DetectionDataset, load_split
from yolo_mobile.datasets.labels import read_yolo_labels

NAMES = ("a", "b", "c")
BAD_NAME = os.fsdecode(b"caf\xe9")  # not valid UTF-8: Python keeps the byte as a surrogate escape


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small dataset, a 3-class checkpoint, and bad files made from them."""
    root = tmp_path_factory.mktemp("bad_input")
    data = make_yolo_dataset(root / "ds", {"i1": "0 0.5 0.5 0.4 0.4\n", "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES)
    model = build_model("yolov5n.yaml", nc=3, pretrained=False)
    model.names = list(NAMES)
    good = model.save(root / "good.pt")
    raw = good.read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 3])
    (root / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "empty.pt").write_bytes(b"")
    with open(root / "pickled.pt", "wb") as f:
        pickle.dump({"model": Payload(), "config": {}}, f, protocol=2)
    # weights of a 5-class model under the 3-class model's config: the head's tensors differ in shape
    five = build_model("yolov5n.yaml", nc=5, pretrained=False)
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["model"] = checkpoint["ema"] = five.state_dict()
    checkpoint["train_args"] = {"cfg": "yolov5n.yaml", "data": str(data), "epochs": 2, "imgsz": 64, "batch": 2,
                                "workers": 0, "val": False, "plot_batches": 0, "project": str(root / "runs")}
    checkpoint["epoch"] = 0
    torch.save(checkpoint, root / "mismatch.pt")
    (root / "not.onnx").write_text("not a model\n")
    (root / "folder").mkdir()
    return {"root": root, "data": data, "images": root / "ds" / "images" / "val"}


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/yolo_mobile_pwned_16", "w"))


def _written(text, folder=""):
    """argv maker's helper: ``text`` (str or bytes) written to a YAML file in the fixture's ``folder``."""
    def make(f):
        path = f["root"] / folder / f"file_{abs(hash(text))}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    return make


def _detect_with(weights, *flags):
    """argv of detect with the fixture's ``weights`` file on its images."""
    return lambda f: ["detect", "--weights", f["root"] / weights, "--source", f["images"], *flags]


def _train_with(*flags):
    """argv of a short training run on the fixture's data, with ``flags``."""
    return lambda f: ["train", "--cfg", "yolov5n.yaml", "--data", f["data"], "--epochs", "1", *flags]


def _coco_data(f, annotations):
    """A data YAML whose train split is a COCO instances file holding ``annotations`` (bytes)."""
    root = f["root"] / f"coco_{abs(hash(annotations))}"
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "instances_bad.json").write_bytes(annotations)
    (root / "data.yaml").write_text("path: .\ntrain: instances_bad.json\ntrain_images: bad\nnames: [a, b, c]\n")
    return root / "data.yaml"


def _model_yaml(command, section):
    """argv of ``command`` on a model YAML whose second line is ``section``."""
    return lambda f: [command, "--cfg", _written(f"backbone: {{name: cspdarknet}}\n{section}\n")(f)]


NESTED_ALIASES = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))

SIZED_COMMANDS = {
    "train": _train_with(),
    "val": lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", f["data"]],
    "detect": lambda f: ["detect", "--cfg", "yolov5n.yaml", "--source", f["images"]],
    "export": lambda f: ["export", "--cfg", "yolov5n.yaml"],
}

# (id, argv from the fixture's paths, fragment of the one error line)
ROWS = [
    ("label-nan-val", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", _labels(f, "nan 0.5 0.5 0.2 0.2")],
     "labels/val/i1.txt:1: not a finite number"),
    ("names-mixed-keys", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", _written(
        "path: .\nval: images/val\nnames: {0: a, x: b, 2: c}\n", "ds")(f)], "'names' ids must all be integers"),
    ("latin-1-yaml", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", _written(
        "path: .\nval: images/val\nnames: [caf\xe9, b, c]\n".encode("latin-1"), "ds")(f)], ".yaml:3: not UTF-8 text"),
    ("nested-aliases", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", _written(
        "path: .\nval: images/val\nnames: [a, b, c]\n" + NESTED_ALIASES, "ds")(f)], "alias *a is not allowed"),
    ("mismatch-detect", _detect_with("mismatch.pt"),
     "mismatch.pt: weights do not fit the model"),
    ("mismatch-val", lambda f: ["val", "--weights", f["root"] / "mismatch.pt", "--data", f["data"]],
     "head.cls.0.2.weight (5, "),
    ("mismatch-export", lambda f: ["export", "--weights", f["root"] / "mismatch.pt", "--output",
                                   f["root"] / "runs" / "m.onnx"],
     "the checkpoint was built from yolov5n.yaml: backbone cspdarknet (variant n), nc=3"),
    ("mismatch-resume", lambda f: ["train", "--resume", f["root"] / "mismatch.pt"],
     "mismatch.pt: weights do not fit the model built from its stored config with the data's 3 classes"),
    ("truncated-pt", _detect_with("truncated.pt"),
     "truncated.pt: not a yolo-mobile checkpoint that loads safely: not a PyTorch file, or truncated"),
    ("random-pt", lambda f: ["val", "--weights", f["root"] / "random.pt", "--data", f["data"]],
     "random.pt: not a yolo-mobile checkpoint that loads safely: not a PyTorch file"),
    ("empty-pt", lambda f: ["export", "--weights", f["root"] / "empty.pt"],
     "empty.pt: not a yolo-mobile checkpoint that loads safely: the file is empty"),
    ("pickled-pt", _detect_with("pickled.pt"),
     "holds pickled Python objects (io.open), which are never loaded"),
    ("not-onnx", _detect_with("not.onnx"),
     "not.onnx: not an ONNX model that ONNX Runtime can load"),
    *[(f"imgsz-{size}-{name}", lambda f, cmd=cmd, size=size: [*cmd(f), "--imgsz", size],
       f"--imgsz must be a positive multiple of 32, got {size}")
      for size in ("0", "-32") for name, cmd in SIZED_COMMANDS.items()],
    ("export-batch-0", lambda f: ["export", "--cfg", "yolov5n.yaml", "--batch", "0"], "--batch: must be >= 1, got 0"),
    ("export-opset-5", lambda f: ["export", "--cfg", "yolov5n.yaml", "--opset", "5", "--imgsz", "64"],
     "opset must be in 9.."),
    ("export-output-folder", lambda f: ["export", "--cfg", "yolov5n.yaml", "--imgsz", "64", "--output",
                                        f["root"] / "folder"], "folder: is a folder"),
    ("reg-max-0", _model_yaml("export", "head: {reg_max: 0}"),
     ".yaml:2: 'head.reg_max' must be an integer >= 1, got 0"),
    ("sppf-kernel--5", _model_yaml("export", "neck: {sppf_kernel: -5}"),
     "'neck.sppf_kernel' must be an odd integer >= 1, got -5"),
    ("depth--1", _model_yaml("export", "neck: {depth: -1}"), "'neck.depth' must be a finite number > 0, got -1"),
    ("width-0", _model_yaml("info", "neck: {width: 0}"), "'neck.width' must be a finite number > 0, got 0"),
    ("conf--1", lambda f: ["detect", "--cfg", "yolov5n.yaml", "--source", f["images"], "--conf", "-1"],
     "--conf: must be in [0, 1], got -1"),
    ("val-iou-2", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", f["data"], "--iou", "2"],
     "--iou: must be in [0, 1], got 2"),
    ("classes-500", _detect_with("good.pt", "--classes", "1", "500"),
     "classes [500] outside 0..2 (the model has 3 classes)"),
    ("detect-batch-0", lambda f: ["detect", "--cfg", "yolov5n.yaml", "--source", f["images"], "--batch", "0"],
     "--batch: must be >= 1, got 0"),
    ("val-batch-0", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", f["data"], "--batch", "0"],
     "--batch: must be >= 1, got 0"),
    ("unknown-command", lambda f: ["frobnicate"], "invalid choice: 'frobnicate'"),
    # found beyond the table
    ("val-workers--1", lambda f: ["val", "--cfg", "yolov5n.yaml", "--data", f["data"], "--workers", "-1"],
     "--workers: must be >= 0, got -1"),
    ("train-lr0--1", _train_with("--lr0", "-1"), "lr0 must be a finite number in (0, inf), got -1.0"),
    ("train-scales-reversed", _train_with("--multi-scale", "--min-scale", "2", "--max-scale", "1"),
     "min_scale 2.0 is above max_scale 1.0"),
    ("train-n-scales-0", _train_with("--multi-scale", "--n-scales", "0"), "n_scales must be at least 1, got 0"),
    ("coco-json-invalid", lambda f: _train_with()({**f, "data": _coco_data(f, b'{"images": [')}),
     "instances_bad.json:1: invalid JSON"),
    ("coco-json-latin-1", lambda f: _train_with()({**f, "data": _coco_data(f, '{"x": "caf\xe9"}'.encode("latin-1"))}),
     "instances_bad.json: not UTF-8 text (byte 0xe9"),
    ("inspect-random-pt", lambda f: ["weights", "inspect", f["root"] / "random.pt"],
     "random.pt: not a readable torch weights file (4,096 bytes: truncated, corrupt or another format)"),
]


def _labels(f, line):
    """A copy of the dataset whose first label file holds ``line``."""
    root = f["root"] / f"labels_{abs(hash(line))}"
    data = make_yolo_dataset(root, {"i1": line + "\n", "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES)
    return data


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize(("argv", "fragment"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_one_line_exit_2_nothing_written(files, argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/, a default export and any other output would appear here
    code, out = _run(argv(files), capsys)
    errors = [line for line in out.err.splitlines() if line.startswith("yolo-mobile: error:")]
    assert code == 2, out.err
    assert len(errors) == 1 and fragment in errors[0], out.err
    assert "Traceback" not in out.err and "weights_only=False" not in out.err and "Re-running" not in out.err
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # no run folder, no partial file
    assert not (files["root"] / "runs").exists()  # where the resumed run and the export would write
    assert not os.path.exists("/tmp/yolo_mobile_pwned_16")


def test_verbose_shows_the_traceback(files, capsys):
    with pytest.raises(ValueError, match="loads safely"):
        main(["detect", "--weights", str(files["root"] / "empty.pt"), "--source", str(files["images"]), "--verbose"])


def test_export_that_fails_its_parity_check_leaves_no_file(tmp_path, capsys, monkeypatch):
    from yolo_mobile.export import checks

    monkeypatch.setattr(checks, "PARITY_TOLERANCE", 0.0)
    out = tmp_path / "m.onnx"
    code, captured = _run(["export", "--cfg", "yolov5n.yaml", "--imgsz", "64", "--output", out], capsys)
    assert code == 2 and "m.onnx: ONNX Runtime differs from PyTorch" in captured.err
    assert "nothing was written" in captured.err and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- odd files that work
def _rename_to_bad_name(images, stem="i1"):
    """Give image ``stem`` (and its label) a file name that is not valid UTF-8."""
    image = images / f"{stem}.jpg"
    label = images.parent.parent / "labels" / images.name / f"{stem}.txt"
    image.rename(images / f"{BAD_NAME}.jpg")
    label.rename(label.with_name(f"{BAD_NAME}.txt"))
    return images / f"{BAD_NAME}.jpg"


def test_detect_and_val_read_an_image_whose_name_is_not_utf8(tmp_path, capsys, monkeypatch):
    data = make_yolo_dataset(tmp_path / "ds", {"i1": "0 0.5 0.5 0.4 0.4\n", "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES)
    images = tmp_path / "ds" / "images" / "val"
    bad = _rename_to_bad_name(images)
    monkeypatch.chdir(tmp_path)
    code, out = _run(["detect", "--cfg", "yolov5n.yaml", "--source", images, "--imgsz", "64", "--save-txt"],
                     capsys)
    assert code == 0 and "2 frames" in out.out and "Skipped" not in out.out, out.err
    saved = tmp_path / "runs" / "detect" / "exp"
    assert (saved / bad.name).is_file() and (saved / "labels" / f"{BAD_NAME}.txt").is_file()
    code, out = _run(["val", "--cfg", "yolov5n.yaml", "--data", data, "--imgsz", "64", "--workers", "0"], capsys)
    assert code == 0 and "Skipped" not in out.out, out.err
    assert (tmp_path / "runs" / "val" / "exp" / "metrics.json").is_file()


def test_train_split_with_a_name_that_is_not_utf8(tmp_path):
    data = make_yolo_dataset(tmp_path / "ds", {"i1": "0 0.5 0.5 0.4 0.4\n", "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES)
    bad = _rename_to_bad_name(tmp_path / "ds" / "images" / "val")
    for _ in range(2):  # scanned, then read back from the label cache
        samples = load_split(load_data_config(data), "train")
        assert sorted(s.path.name for s in samples) == sorted([bad.name, "i2.jpg"])
    dataset = DetectionDataset(samples, 64, augment=False)
    k = [s.path for s in samples].index(bad)
    image, boxes = dataset[k]
    assert image.shape == (3, 64, 64) and boxes.tolist() and boxes[0, 0] == 0


def test_video_whose_name_is_not_utf8(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(plain), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for k in range(3):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    video = plain.rename(tmp_path / f"{BAD_NAME}.avi")
    monkeypatch.chdir(tmp_path)
    code, out = _run(["detect", "--cfg", "yolov5n.yaml", "--source", video, "--imgsz", "64"], capsys)
    assert code == 0 and "3 frames" in out.out, out.err
    assert [p.name for p in (tmp_path / "runs" / "detect" / "exp").iterdir()] == ["caf\ufffd.mp4"]


def test_zero_frame_video_warns_and_leaves_no_folder(tmp_path, capsys, caplog, monkeypatch):
    plain = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(plain), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    raw = plain.read_bytes()
    plain.write_bytes(raw[: raw.index(b"movi") + 4])  # the header and no frame
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        code, out = _run(["detect", "--cfg", "yolov5n.yaml", "--source", plain, "--imgsz", "64"], capsys)
    assert code == 2 and "v.avi: no image or frame could be read" in out.err  # nothing was done: not a success
    assert any("v.avi: no frame could be read" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "runs" / "detect" / "exp").exists()


def test_label_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff1 0.5 0.5 0.2 0.2\n".encode())
    assert read_yolo_labels(path, 3) == pytest.approx(np.array([[1, 0.5, 0.5, 0.2, 0.2]]))


# ------------------------------------------------------------------------------ skipped, named and counted
@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-inf"])
def test_non_finite_class_skips_that_image_with_file_and_line(tmp_path, caplog, value):
    data = make_yolo_dataset(tmp_path, {"i1": f"0 0.5 0.5 0.2 0.2\n{value} 0.5 0.5 0.2 0.2\n",
                                        "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES)
    with caplog.at_level(logging.INFO):
        samples = load_split(load_data_config(data), "train")
    assert [s.path.name for s in samples] == ["i2.jpg"]
    text = caplog.text
    assert f"labels/val/i1.txt:2: not a finite number in '{value} 0.5 0.5 0.2 0.2'" in text
    assert "skipped: 1 bad label" in text


def test_truncated_jpeg_is_found_at_scan_time(tmp_path, caplog):
    data = make_yolo_dataset(tmp_path, {"i1": "0 0.5 0.5 0.2 0.2\n", "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES,
                             sizes={"i1": (240, 320)})
    image = tmp_path / "images" / "val" / "i1.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    with caplog.at_level(logging.INFO):
        samples = load_split(load_data_config(data), "train")
    assert [s.path.name for s in samples] == ["i2.jpg"]
    assert f"truncated JPEG {image}: no end-of-image marker" in caplog.text
    assert "skipped: 1 truncated JPEG" in caplog.text


def test_zero_byte_image_in_val_is_skipped_and_counted(tmp_path, capsys, caplog, monkeypatch):
    data = make_yolo_dataset(tmp_path / "ds", {"i1": "0 0.5 0.5 0.4 0.4\n", "i2": "1 0.3 0.3 0.2 0.2\n"}, NAMES)
    empty = tmp_path / "ds" / "images" / "val" / "i1.jpg"
    empty.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        code, out = _run(["val", "--cfg", "yolov5n.yaml", "--data", data, "--imgsz", "64", "--workers", "0"],
                         capsys)
    assert code == 0, out.err
    assert "Skipped 1 unreadable image(s)" in out.out
    assert f"{empty}: cannot read image size" in caplog.text


def test_truncated_jpeg_in_a_coco_split_is_skipped_and_named(tmp_path):
    import json

    from yolo_mobile.datasets.detection import load_coco_samples

    for stem in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{stem}.jpg"), np.full((48, 64, 3), 128, np.uint8))
    cut = tmp_path / "a.jpg"
    cut.write_bytes(cut.read_bytes()[:-40])
    gt = {"images": [{"id": k, "file_name": f"{s}.jpg", "width": 64, "height": 48} for k, s in enumerate("ab")],
          "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    samples, problems, _ = load_coco_samples(tmp_path / "gt.json", tmp_path)
    assert [s.path.name for s in samples] == ["b.jpg"]
    assert problems == [f"truncated JPEG {cut}: no end-of-image marker; re-save or replace the file"]
