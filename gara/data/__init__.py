"""Datasets (COCO instance segmentation + image folder), corruptions and the embedded sample."""
