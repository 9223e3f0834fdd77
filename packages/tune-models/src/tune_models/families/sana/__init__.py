"""Sana (NVIDIA / MIT HAN Lab): see :mod:`.family`."""
