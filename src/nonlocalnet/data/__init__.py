"""Video data (paper §4.1): decoding, annotation readers, clip sampling, the paper's augmentation,
the map-style dataset and the built-in synthetic set."""

from .datasets import (AnnotationError, Annotations, Skipped, VideoDataset, VideoRecord, collate, read_charades_csv,
                       read_class_folders, read_classes, read_kinetics_csv, read_list)
from .decode import VideoError, VideoInfo, decode_frames, probe
from .sampling import train_clip_indices, uniform_clip_indices
from .transforms import spatial_views, train_transform

__all__ = ["VideoError", "VideoInfo", "decode_frames", "probe", "train_clip_indices", "uniform_clip_indices",
           "train_transform", "spatial_views", "AnnotationError", "Annotations", "VideoRecord", "VideoDataset",
           "Skipped", "collate", "read_list", "read_classes", "read_kinetics_csv", "read_class_folders",
           "read_charades_csv"]
