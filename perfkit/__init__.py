"""perfkit: profiling and bottleneck analysis for distributed PyTorch training.

Importing this package is cheap: it does not import torch. The trainer, collectors and analyzers
are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
