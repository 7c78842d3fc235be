"""Metrics for images (images.py) and text (text.py)."""
