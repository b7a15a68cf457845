"""boatvit: BOAT (Bilateral Local Attention Vision Transformer) for PyTorch and timm.

Importing the package registers the BOAT models with timm (``timm.create_model('boat_swin_tiny_224')``).
"""

from .clustering import balanced_hierarchical_clustering, cluster_layout
from .fsla import FeatureSpaceAttention, feature_space_attention
from .models import BoatCSWinTransformer, BoatSwinTransformer
from .version import __version__
from .weights import load_model, load_reference_weights, read_weights

__all__ = [
    '__version__',
    'balanced_hierarchical_clustering',
    'cluster_layout',
    'feature_space_attention',
    'FeatureSpaceAttention',
    'BoatSwinTransformer',
    'BoatCSWinTransformer',
    'load_reference_weights',
    'read_weights',
    'load_model',
]
