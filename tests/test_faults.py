"""Faults from outside (issue 29): a full disk, a read-only folder, two runs at once, moved files. Nothing the user
had is lost, no temporary is left, and the CLI says what happened in one line. Real faults where this machine can
make them (tmpfs mounts need root; those tests skip otherwise), a monkeypatched write where it cannot."""

import errno
import json
import logging
import multiprocessing
import subprocess
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_yolo_dataset

from yolo_mobile import build_model
from yolo_mobile.cli import main
from yolo_mobile.datasets.labels import read_yolo_labels
from yolo_mobile.engine import trainer as trainer_module
from yolo_mobile.engine.checkpoint import save_checkpoint
from yolo_mobile.engine.device import select_device
from yolo_mobile.files import claim_run_dir, describe_os_error, write_text

TRAIN = ["--imgsz", "64", "--batch", "2", "--workers", "0", "--plot-batches", "0"]


def _mount(path: Path, options: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def mounts(tmp_path):
    """``mounts("full", "size=1m")`` mounts a small tmpfs under tmp_path; all are unmounted afterwards."""
    made = []

    def mount(name: str, options: str) -> Path:
        made.append(_mount(tmp_path / name, options))
        return made[-1]

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run on a 2-image set at 64 px: its folder, data YAML and a copy of last.pt."""
    root = tmp_path_factory.mktemp("faults")
    data = make_yolo_dataset(root / "ds", {"i1": "0 0.5 0.5 0.4 0.4\n", "i2": "1 0.3 0.3 0.2 0.2\n"})
    code = main(["train", "--cfg", "yolov5n.yaml", "--data", str(data), "--epochs", "2", *TRAIN,
                 "--project", str(root / "runs")])
    assert code == 0
    return {"root": root, "data": data, "run": root / "runs" / "exp"}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("yolo-mobile: error")]


# ------------------------------------------------------------------------------- 1. --resume outside a run
def test_resume_outside_a_run_folder_never_writes_into_its_grandparent(trained, tmp_path, monkeypatch):
    d = tmp_path / "d"
    (d / "Downloads").mkdir(parents=True)
    (d / "results.csv").write_text("notes\n")
    (d / "Downloads" / "last.pt").write_bytes((trained["run"] / "weights" / "last.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(d / "Downloads" / "last.pt"), "--epochs", "3"]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["Downloads", "results.csv"]
    assert (d / "results.csv").read_text() == "notes\n"
    assert sorted(p.name for p in (d / "Downloads").iterdir()) == ["last.pt"]
    new_run = trained["root"] / "runs" / "exp2"  # the run's own project, a new number
    assert torch.load(new_run / "weights" / "last.pt", weights_only=True)["epoch"] == 2
    assert len((new_run / "results.csv").read_text().splitlines()) == 4  # header and all three epochs


def test_resume_of_best_pt_behind_last_pt_is_refused(trained, capsys):
    weights = trained["run"] / "weights"
    best = torch.load(weights / "last.pt", weights_only=True)
    best["epoch"] = 0
    torch.save(best, weights / "older.pt")
    before = (weights / "last.pt").read_bytes()
    assert main(["train", "--resume", str(weights / "older.pt"), "--epochs", "3"]) == 2
    line = _lines(capsys.readouterr().err)
    assert len(line) == 1 and "epoch 1 of a run whose last.pt is at epoch 2" in line[0], line
    assert (weights / "last.pt").read_bytes() == before
    (weights / "older.pt").unlink()


def test_finished_resume_is_refused_before_the_data_is_read(trained, capsys, monkeypatch):
    def no_scan(*args, **kwargs):
        raise AssertionError("the data was scanned before the refusal")

    monkeypatch.setattr(trainer_module, "load_split", no_scan)
    assert main(["train", "--resume", str(trained["run"] / "weights" / "last.pt")]) == 2
    assert "training already finished (2 epochs)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- 2. a full disk
def test_checkpoint_on_a_full_disk_leaves_no_temporary_and_says_so(mounts):
    full = mounts("full", "size=1m")
    model = build_model("yolov5n.yaml", nc=3, pretrained=False)
    with pytest.raises(OSError) as caught:
        save_checkpoint(full / "last.pt", model, ema=model)
    assert caught.value.errno == errno.ENOSPC
    assert list(full.iterdir()) == []  # the half-written temporary is gone
    text = describe_os_error(caught.value)
    assert text.startswith(f"no space left on device: {full / 'last.pt'} needs about ")
    assert "MB free there" in text


def test_train_on_a_full_disk_is_one_line(trained, mounts, capsys):
    full = mounts("full", "size=1m")
    code = main(["train", "--cfg", "yolov5n.yaml", "--data", str(trained["data"]), "--epochs", "1", *TRAIN,
                 "--project", str(full)])
    assert code == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no space left on device" in lines[0] and "best.pt needs about" in lines[0], lines
    assert list(full.iterdir()) == []  # the run, which holds no checkpoint, is removed


def test_results_csv_lists_only_epochs_whose_checkpoint_was_written(trained, tmp_path, monkeypatch):
    real = trainer_module.save_checkpoint

    def second_epoch_fails(path, *args, epoch=None, **kwargs):
        if epoch == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", second_epoch_fails)
    with pytest.raises(OSError):
        trainer_module.train("yolov5n.yaml", data=trained["data"], epochs=2, imgsz=64, batch=2, workers=0,
                             plot_batches=0, project=str(tmp_path / "runs"))
    run = tmp_path / "runs" / "exp"
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")  # epoch 1 only
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["epoch"] == 0


# ------------------------------------------------------------------------------- 3. runs started together
def _claim(args):
    project, barrier = args
    barrier.wait()
    return str(claim_run_dir(project, "exp"))


def test_runs_started_together_get_a_folder_each(tmp_path):
    n = 8
    with multiprocessing.get_context("fork").Manager() as manager:
        barrier = manager.Barrier(n)
        with multiprocessing.get_context("fork").Pool(n) as pool:
            claimed = pool.map(_claim, [(tmp_path / "runs", barrier)] * n)
    assert len(set(claimed)) == n
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(["exp", *(f"exp{i}" for i in
                                                                                        range(2, n + 1))])


# ------------------------------------------------------------------------------ 4. detect keeps every output
def test_detect_keeps_an_output_for_every_image(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    for name in ("a/img.jpg", "b/img.jpg", "img.png"):
        (tmp_path / "dup" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "dup" / name), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    (tmp_path / "dup" / "clip.mp4").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["detect", "--cfg", "yolov5n.yaml", "--source", "dup", "--imgsz", "64", "--conf", "0",
                     "--max-det", "3", "--save-txt", "--save-json"]) == 0
    run = tmp_path / "runs" / "detect" / "exp"
    images = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.suffix in (".jpg", ".png"))
    assert images == ["a/img.jpg", "b/img.jpg", "img.png"]
    labels = sorted(run.glob("labels/**/*.txt"))
    assert len(labels) == 3
    assert sum(len(p.read_text().splitlines()) for p in labels) == len(json.loads((run / "predictions.json")
                                                                                  .read_text())) == 9
    assert "1 video(s) left out (dup/clip.mp4)" in caplog.text  # a folder's videos are named, not ignored


def test_images_differing_only_in_suffix_keep_a_label_file_each(tmp_path, monkeypatch):
    for suffix in (".jpg", ".png"):
        cv2.imwrite(str(tmp_path / f"img{suffix}"), np.full((48, 64, 3), 90, np.uint8))
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "--cfg", "yolov5n.yaml", "--source", str(tmp_path / "img.*"), "--imgsz", "64",
                 "--conf", "0", "--max-det", "2", "--save-txt", "--project", "out"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "exp" / "labels").iterdir()) == ["img.jpg.txt", "img.png.txt"]


def test_detect_on_nothing_readable_exits_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.jpg").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "--cfg", "yolov5n.yaml", "--source", "bad.jpg", "--imgsz", "64"]) == 2
    assert "bad.jpg: no image or frame could be read (1 unreadable)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "detect" / "exp").exists()


# ------------------------------------------------------------------------ 5. OSError: one line, exit 2
@pytest.fixture
def read_only(mounts):
    return mounts("ro", "size=1m,ro")


def test_read_only_project_for_train_is_said_before_the_data_scan(trained, read_only, capsys, monkeypatch):
    def no_scan(*args, **kwargs):
        raise AssertionError("the data was scanned before the refusal")

    monkeypatch.setattr(trainer_module, "resolve_data", no_scan)
    code = main(["train", "--cfg", "yolov5n.yaml", "--data", str(trained["data"]), "--epochs", "1", *TRAIN,
                 "--project", str(read_only / "runs")])
    assert code == 2
    assert _lines(capsys.readouterr().err) == [f"yolo-mobile: error: train: read-only file system: {read_only}/runs"]


@pytest.mark.parametrize("command", ["val", "detect", "export"])
def test_read_only_target_is_one_line(trained, read_only, command, capsys):
    argv = {"val": ["val", "--cfg", "yolov5n.yaml", "--data", str(trained["data"]), "--imgsz", "64",
                    "--project", str(read_only)],
            "detect": ["detect", "--cfg", "yolov5n.yaml", "--source", str(trained["root"] / "ds" / "images"),
                       "--imgsz", "64", "--project", str(read_only)],
            "export": ["export", "--cfg", "yolov5n.yaml", "--imgsz", "64", "--output", str(read_only / "m.onnx")]}
    assert main(argv[command]) == 2
    err = capsys.readouterr().err
    assert _lines(err) == [f"yolo-mobile: error: {command}: read-only file system: {read_only}"], err
    assert "Traceback" not in err


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(mounts, capsys):
    full = mounts("full", "size=1m")
    assert main(["export", "--cfg", "yolov5n.yaml", "--imgsz", "64", "--output", str(full / "m.onnx")]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"yolo-mobile: error: export: no space left on device: "
                                                   f"{full / 'm.onnx'}"), lines
    assert list(full.iterdir()) == []


def test_a_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old\n")

    def refuse(*args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("yolo_mobile.files.os.replace", refuse)
    with pytest.raises(OSError) as caught:
        write_text(target, "new\n")
    assert caught.value.filename == str(target) and target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_devices_as_users_spell_them(monkeypatch):
    with pytest.raises(ValueError, match="no Apple MPS device"):
        select_device("mps") if not torch.backends.mps.is_available() else pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match="val runs on one GPU") as caught:
        select_device("0,1", "val")
    assert "torchrun" not in str(caught.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda") == torch.device("cuda:0")  # PyTorch's own spelling


# -------------------------------------------------------------------------------- 6. silent wrong results
def test_val_with_no_ground_truth_says_so(tmp_path, capsys, monkeypatch):
    data = make_yolo_dataset(tmp_path / "ds", {"i1": None, "i2": None})
    monkeypatch.chdir(tmp_path)
    assert main(["val", "--cfg", "yolov5n.yaml", "--data", str(data), "--imgsz", "64"]) == 2
    err = capsys.readouterr().err
    assert "no ground truth: no label file with an object for any of its 2 images" in err
    assert "labels/val/i1.txt" in err
    assert not (tmp_path / "runs").exists()


def test_duplicate_label_lines_count_once_with_one_warning(tmp_path, caplog):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n0 0.5 0.5 0.2 0.2\n")
    with caplog.at_level(logging.WARNING):
        rows = read_yolo_labels(path, 3)
    assert rows == pytest.approx(np.array([[0, 0.5, 0.5, 0.2, 0.2], [1, 0.3, 0.3, 0.1, 0.1]]))
    assert [r.getMessage() for r in caplog.records] == [f"{path}: 2 duplicated line(s) dropped (each object "
                                                        "counts once)"]


# ---------------------------------------------------------------------------------------------- 7. smaller
def test_a_coordinate_off_by_rounding_is_clipped_not_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 1.0000001 0.2\n")
    assert read_yolo_labels(path, 3) == pytest.approx(np.array([[0, 0.5, 0.5, 1.0, 0.2]]))
    path.write_text("0 0.5 0.5 1.01 0.2\n")
    with pytest.raises(ValueError, match="not normalised xywh"):
        read_yolo_labels(path, 3)


def test_interrupted_val_leaves_no_run_folder(trained, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("yolo_mobile.engine.validate.validate", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["val", "--cfg", "yolov5n.yaml", "--data", str(trained["data"]), "--imgsz", "64"]) == 130
    assert not (tmp_path / "runs" / "val" / "exp").exists()


def test_an_image_that_breaks_during_training_is_warned_about_once(tmp_path, caplog):
    from yolo_mobile.config import load_data_config
    from yolo_mobile.datasets.detection import DetectionDataset, load_split

    data = make_yolo_dataset(tmp_path / f"ds{uuid.uuid4().hex[:6]}", {"i1": "0 0.5 0.5 0.4 0.4\n",
                                                                      "i2": "1 0.3 0.3 0.2 0.2\n"})
    samples = load_split(load_data_config(data), "train")
    samples[0].path.write_bytes(b"")  # broken after the scan
    dataset = DetectionDataset(samples, 64, augment=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            dataset[0]
    assert sum("skipped unreadable image during training" in r.getMessage() for r in caplog.records) == 1
    assert int(dataset.unreadable.sum()) == 1
