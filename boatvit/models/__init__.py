"""The BOAT model families; importing this registers their timm model names."""

from .base import BoatStage, BoatTransformer
from .boat_cswin import BilateralCSWinBlock, BoatCSWinTransformer, CrossShapedWindowAttention
from .boat_swin import BilateralSwinBlock, BoatSwinTransformer

__all__ = [
    'BoatStage',
    'BoatTransformer',
    'BilateralCSWinBlock',
    'BoatCSWinTransformer',
    'CrossShapedWindowAttention',
    'BilateralSwinBlock',
    'BoatSwinTransformer',
]
