"""Datasets: YOLO-format and COCO-JSON readers, letterboxing, and (for training) augmentation and sampling."""
