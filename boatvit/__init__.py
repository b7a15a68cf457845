"""boatvit: BOAT (Bilateral Local Attention Vision Transformer) for PyTorch and timm.

Importing the package registers the BOAT models with timm (``timm.create_model('boat_swin_tiny_224')``).
"""

from .checkpoint import load_reference_weights
from .clustering import balanced_hierarchical_clustering, cluster_layout
from .fsla import FeatureSpaceAttention, feature_space_attention
from .models import BoatCSWinTransformer, BoatSwinTransformer

__version__ = '0.1.0'

__all__ = [
    'balanced_hierarchical_clustering',
    'cluster_layout',
    'feature_space_attention',
    'FeatureSpaceAttention',
    'BoatSwinTransformer',
    'BoatCSWinTransformer',
    'load_reference_weights',
]
