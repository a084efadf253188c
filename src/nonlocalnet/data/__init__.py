"""Video data (paper §4.1): decoding, clip sampling and the paper's augmentation."""

from .decode import VideoError, VideoInfo, decode_frames, probe
from .sampling import uniform_clip_indices, train_clip_indices
from .transforms import spatial_views, train_transform

__all__ = ["VideoError", "VideoInfo", "decode_frames", "probe", "train_clip_indices", "uniform_clip_indices",
           "train_transform", "spatial_views"]
