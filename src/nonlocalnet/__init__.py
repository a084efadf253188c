"""nonlocalnet: Non-local Neural Networks (Wang, Girshick, Gupta, He, CVPR 2018) in PyTorch."""

from .attention import attention_weights, nonlocal_attention
from .block import NonLocalBlock, add_nonlocal
from .models import create_model, list_models, model_card

__version__ = "0.1.0"
__all__ = ["NonLocalBlock", "add_nonlocal", "attention_weights", "nonlocal_attention", "create_model", "list_models",
           "model_card", "__version__"]
