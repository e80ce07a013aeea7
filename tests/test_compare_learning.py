"""scripts/compare_learning.py hands ultralytics the same data as ours, through links in its own folder."""

import importlib.util
import os
from pathlib import Path

import yaml

os.environ.setdefault("YOLO_OFFLINE", "1")


def compare_learning():
    path = Path(__file__).parents[1] / "scripts" / "compare_learning.py"
    spec = importlib.util.spec_from_file_location("compare_learning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ultralytics_reads_the_set_through_links_in_the_workdir(tmp_path):
    from ultralytics.data.utils import img2label_paths

    shared = tmp_path / "shared" / "set"
    for folder, name in (("images/train2017", "a.jpg"), ("labels/train2017", "a.txt")):
        (shared / folder).mkdir(parents=True)
        (shared / folder / name).write_text("0 0.5 0.5 0.2 0.2\n" if name.endswith(".txt") else "")
    data = tmp_path / "repo" / "data" / "set_trainval.yaml"  # `path` relative to the YAML, val = train
    data.parent.mkdir(parents=True)
    data.write_text("path: ../../shared/set\ntrain: images/train2017\nval: images/train2017\nnames: [thing]\n")
    work = tmp_path / "work"
    work.mkdir()

    theirs = compare_learning().ultralytics_data(data, work)

    doc = yaml.safe_load(theirs.read_text())
    root = Path(doc["path"])
    assert root.is_absolute() and root.is_relative_to(work) and doc["names"] == {0: "thing"}
    for split in ("train", "val"):
        image = root / doc[split] / "a.jpg"
        assert image.is_file()
        label = Path(img2label_paths([str(image)])[0])  # where ultralytics looks, and beside it its .cache
        assert label.read_text() == "0 0.5 0.5 0.2 0.2\n" and label.parent.is_relative_to(work)
    assert compare_learning().ultralytics_data(data, work) == theirs  # a second run reuses the links
