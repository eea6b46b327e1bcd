"""TFDS builders that ship with ddjax; importing this package registers them with TFDS."""
from ddjax.datasets import digits  # noqa: F401  (registers 'digits')
