"""Deployment formats. ONNX: ``export_onnx`` in onnx.py."""
