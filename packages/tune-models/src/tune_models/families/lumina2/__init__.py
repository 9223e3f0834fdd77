"""Lumina Image 2.0 (Alpha-VLLM): see :mod:`.family`."""
