"""Stable Diffusion XL (base, refiner). Importing this package is cheap; ``family`` imports torch."""
