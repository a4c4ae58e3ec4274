"""fastrlhf: RLHF with fused C++/CUDA kernels.

Layers (imports only go downward): ``ops`` (kernels behind a functional API, with pure-PyTorch
references in ``ops.reference``) -> models -> generation -> feedback -> trainers -> cli.
"""

from fastrlhf import ops
from fastrlhf._ext import build_info, extension_available

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "extension_available", "__version__"]
