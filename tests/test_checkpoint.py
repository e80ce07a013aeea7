import pickle

import pytest
import torch

from yolo_mobile import build_model, load_model
from yolo_mobile.engine.checkpoint import load_checkpoint


def test_save_load_round_trip(tmp_path):
    model = build_model("yolov5n.yaml", nc=3)
    model.names = ["cat", "dog", "bird"]
    path = model.save(tmp_path / "m.pt", epoch=4, metrics={"map": 0.5})
    raw = torch.load(path, weights_only=True)  # the contract: no pickled code
    assert raw["config"]["nc"] == 3 and raw["epoch"] == 4 and raw["names"] == ["cat", "dog", "bird"]
    loaded = load_model(path)
    assert loaded.names == ["cat", "dog", "bird"] and not loaded.training
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_fused_model_cannot_be_saved(tmp_path):
    model = build_model("yolov5n.yaml").fuse()
    with pytest.raises(ValueError, match="fused"):
        model.save(tmp_path / "f.pt")


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/yolo_mobile_pwned", "w"))


def test_pickled_code_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(), "config": {}}, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pt: not a yolo-mobile checkpoint that loads safely"):
        load_checkpoint(path)
    import os

    assert not os.path.exists("/tmp/yolo_mobile_pwned")


def test_foreign_file_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"other.pt: not a yolo-mobile checkpoint \(expected keys model"):
        load_checkpoint(path)
