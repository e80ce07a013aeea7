"""``yolo-mobile export``'s configuration: one field per flag, and the rules between flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError, check_imgsz, flag
from ..engine.postprocess import MAX_DET
from .int8 import CALIB_METHOD, CALIB_METHODS, KEEP_FLOAT

FORMATS = ("onnx", "tflite", "ncnn")
# what only the ONNX exporter reads: a phone format refuses them when they differ from their defaults
ONNX_ONLY = ("batch", "dynamic", "nms", "simplify", "opset", "max_det", "calib_method", "keep_float")


@dataclass
class ExportConfig:
    """``yolo-mobile export``: its flags are these fields (cli.py builds the parser from them)."""

    weights: str | None = flag(None, "a yolo-mobile checkpoint (.pt)", group="model", required=True)
    cfg: str | None = flag(None, "a model YAML or built-in name: an untrained model, for pipeline checks",
                           group="model")
    format: str = flag("onnx", "onnx; tflite (LiteRT, needs .[tflite]); ncnn (a <name>_ncnn/ folder, needs "
                               ".[ncnn])", choices=FORMATS)
    output: str | None = flag(None, "file (folder for ncnn) to write (default: the weights' path with .onnx, "
                                    ".tflite, _int8.tflite or _ncnn)")
    imgsz: int | None = flag(None, "export size (default: the checkpoint's training size, else 640)")
    batch: int = flag(1, "batch of the exported graph (ONNX)", type="positive")
    dynamic: bool = flag(False, "dynamic batch, height and width")
    opset: int = flag(17, "ONNX opset (9 to the newest torch writes)")
    simplify: bool = flag(False, "simplify the graph with onnxslim")
    half: bool = flag(False, "fp16 weights (ONNX: exported on CUDA; tflite, ncnn: on the CPU)")
    nms: bool = flag(False, "embed NMS: outputs (B, max_det, 6) and a count")
    max_det: int = flag(MAX_DET, "detections kept per image by the embedded NMS", type="positive")
    device: str = flag("cpu", "cpu, or a GPU index such as 0 (--half ONNX exports on CUDA)")
    int8: bool = flag(False, "also quantize: static INT8 calibrated on --data, written as <name>_int8.onnx (or "
                             ".tflite); prints float vs INT8 mAP")
    data: str | None = flag(None, "data YAML for --int8: train images calibrate, val images evaluate (default: "
                                  "the checkpoint's training data)")
    calib_images: int = flag(256, "train images for --int8 calibration", type="positive")
    calib_method: str = flag(CALIB_METHOD, "--int8 calibration of the activation ranges", choices=CALIB_METHODS)
    keep_float: list[str] = flag(list(KEEP_FLOAT), "--int8: parts left in float (decode: the box decode; softmax: "
                                                   "every Softmax, attention included); none: quantize them too",
                                 nargs="*", choices=KEEP_FLOAT)

    def changed(self) -> list[str]:
        """The fields set to something other than their default."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != (f.default if f.default is not dataclasses.MISSING
                                             else f.default_factory())]

    def check(self) -> None:
        """The rules between flags, said before any model is built."""
        if (self.weights is None) == (self.cfg is None):
            raise ConfigError("export needs one of --weights or --cfg")
        if self.imgsz is not None:
            check_imgsz(self.imgsz, "--imgsz")
        if self.int8 and self.half:
            raise ConfigError("--half and --int8 are two precisions: choose one")
        if self.format != "onnx":
            given = [f"--{name.replace('_', '-')}" for name in self.changed() if name in ONNX_ONLY]
            if given:
                raise ConfigError(f"{', '.join(given)}: for --format onnx only ({self.format} exports batch 1, "
                                  "fixed size, without NMS)")
            if self.int8 and self.format == "ncnn":
                raise ConfigError("--int8 is for --format onnx or tflite (ncnn's INT8 tools are not in its Python "
                                  "package)")
        elif self.int8 and (self.nms or self.dynamic or self.batch != 1):
            raise ConfigError("--int8 exports a static batch-1 float32 graph: drop --half, --nms, --dynamic, --batch")
