"""nonlocalnet: Non-local Neural Networks (Wang, Girshick, Gupta, He, CVPR 2018) in PyTorch."""

from .attention import attention_weights, nonlocal_attention
from .block import NonLocalBlock, add_nonlocal

__version__ = "0.1.0"
__all__ = ["NonLocalBlock", "add_nonlocal", "attention_weights", "nonlocal_attention", "__version__"]
