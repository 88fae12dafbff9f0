"""lmarch: language-model architectures from scratch in PyTorch.

Each family is written out from its paper, verified against a reference implementation,
and can be trained, sampled, inspected and loaded with real weights.
"""

__version__ = "0.1.0"
