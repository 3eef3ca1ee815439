"""Evaluation: IoU / Dice per corruption x severity x prompt kind, and the report."""
