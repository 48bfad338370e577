"""Datasets: the built-in sets (synthetic, mnist5k, groceries), ImageFolder trees, torchvision sets from local files."""

from .datasets import (DEFAULT_DATA_ROOT, DataSpec, ImageFolderDataset, IndexedDataset, build_dataset,
                       parse_spec)
from .image_io import load_rgb, load_uint8, pil_to_uint8_tensor
from .mnist5k import Mnist5kConfig, ensure_mnist5k
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import SyntheticConfig, ensure_synthetic

__all__ = ["DEFAULT_DATA_ROOT", "DataSpec", "ImageFolderDataset", "IndexedDataset", "build_dataset",
           "parse_spec", "load_rgb", "load_uint8", "pil_to_uint8_tensor", "SYNTHETIC_CLASSES", "SyntheticConfig",
           "ensure_synthetic", "Mnist5kConfig", "ensure_mnist5k"]
