"""FLUX.2 (dev). Importing this package is cheap; ``family`` imports torch."""
