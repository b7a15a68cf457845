"""The BOAT model families; importing this registers their timm model names."""

from .base import BilateralBlock, BoatStage, BoatTransformer, FslaOptions
from .boat_cswin import BilateralCSWinBlock, BoatCSWinTransformer, CrossShapedWindowAttention
from .boat_swin import BilateralSwinBlock, BoatSwinTransformer

__all__ = [
    'BilateralBlock',
    'BoatStage',
    'BoatTransformer',
    'BilateralCSWinBlock',
    'BoatCSWinTransformer',
    'CrossShapedWindowAttention',
    'FslaOptions',
    'BilateralSwinBlock',
    'BoatSwinTransformer',
]
