"""Qwen-Image (see :mod:`tune_models.families.qwen_image.family`)."""
