"""Video backbones of the paper (§4): C2D and I3D ResNet-50/101 with non-local blocks."""

from .resnet3d import Bottleneck3d, ResNet3d, inflated_blocks

__all__ = ["Bottleneck3d", "ResNet3d", "inflated_blocks"]
