"""BOAT as a detection backbone: a ``features_only`` BOAT model under torchvision's feature pyramid.

torchvision's detectors (Faster / Mask R-CNN, RetinaNet, FCOS) take a backbone module with an ``out_channels``
attribute whose forward returns an ``OrderedDict`` of NCHW maps. ``boat_fpn_backbone`` builds one:

    backbone = boat_fpn_backbone('boat_swin_tiny_224')
    detector = torchvision.models.detection.FasterRCNN(backbone, num_classes=91)
"""

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Sequence, Union

import timm
import torch
from timm.models._features import FeatureGetterNet
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .models import BoatTransformer

__all__ = ['BoatBackboneWithFPN', 'boat_fpn_backbone']


class BoatBackboneWithFPN(nn.Module):
    """A ``features_only`` BOAT model (``body``) and a torchvision ``FeaturePyramidNetwork`` (``fpn``) on its maps.

    torchvision's ``BackboneWithFPN`` takes the maps from named child modules (``IntermediateLayerGetter``); a BOAT
    model gives them through ``forward_intermediates`` instead, so this module keeps its layout (``body``, ``fpn``,
    ``out_channels``) with the timm feature wrapper as the body.
    """

    def __init__(
        self,
        body: FeatureGetterNet,
        out_channels: int = 256,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, C, H, W)`` images (any H, W >= 32) to an ``OrderedDict`` of ``(B, out_channels, H_i, W_i)`` maps, one
        per stage in ``body.feature_info`` (keys ``'0'``, ``'1'``, ...; ``H_i`` about ``H / s_i``, ``s_i`` from
        ``body.feature_info.reduction()``), then the extra block's (``'pool'`` for ``LastLevelMaxPool``)."""
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _freeze(model: BoatTransformer, trainable_layers: int) -> None:
    # torchvision's rule (resnet_fpn_backbone): the last `trainable_layers` of stem + stages train, the rest is frozen
    parts = [model.patch_embed, *model.layers]
    if not 0 <= trainable_layers <= len(parts):
        raise ValueError(
            f'trainable_layers must be between 0 and {len(parts)} (the patch embedding and '
            f'{len(model.layers)} stages), got {trainable_layers}.'
        )
    for part in parts[: len(parts) - trainable_layers]:
        part.requires_grad_(False)


def boat_fpn_backbone(
    model: Union[str, nn.Module],
    out_indices: Sequence[int] = (0, 1, 2, 3),
    out_channels: int = 256,
    trainable_layers: Optional[int] = None,
    extra_blocks: Optional[ExtraFPNBlock] = None,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
    **model_kwargs: Any,
) -> BoatBackboneWithFPN:
    """A torchvision-detection-ready BOAT backbone with a feature pyramid.

    Args:
        model: a BOAT timm model name (built with ``features_only=True, dynamic_img_size=True`` and
            ``model_kwargs``), or a BOAT model you built (a classifier, with weights loaded as you like; it is pruned
            to the requested stages and its head dropped, in place) built with ``dynamic_img_size=True``, since
            detection images vary in size.
        out_indices: the stages whose maps feed the pyramid (strides 4, 8, 16, 32 for stages 0-3).
        out_channels: channels of every pyramid level.
        trainable_layers: how many of the patch embedding and the stages, counted from the last stage, train; the
            rest is frozen (``requires_grad=False``). None trains everything. As torchvision's
            ``resnet_fpn_backbone``: 0 freezes the whole BOAT model, 5 (for 4 stages) trains it all.
        extra_blocks: torchvision's extra pyramid block; None is ``LastLevelMaxPool`` (Faster / Mask R-CNN). RetinaNet
            uses ``LastLevelP6P7``.
        norm_layer: normalisation in the pyramid, None for none (torchvision's default).
        **model_kwargs: passed to ``timm.create_model`` when ``model`` is a name (``embed_dim``, ``img_size``,
            ``pretrained_cfg_overlay``, ...).

    Returns:
        A ``BoatBackboneWithFPN`` with ``out_channels``, whose forward returns an ``OrderedDict`` of NCHW maps.
    """
    if isinstance(model, str):
        if 'features_only' in model_kwargs or 'out_indices' in model_kwargs:
            raise ValueError('boat_fpn_backbone sets features_only and out_indices itself; pass out_indices= to it.')
        model_kwargs.setdefault('dynamic_img_size', True)
        model = timm.create_model(model, **model_kwargs)
    elif model_kwargs:
        raise ValueError(
            f'model_kwargs {sorted(model_kwargs)} only apply when model is a name; build the model with them instead.'
        )
    if not isinstance(model, BoatTransformer):
        raise ValueError(
            f'boat_fpn_backbone takes a BOAT model or model name, got {type(model).__name__}; '
            'for a features_only model, pass its name and kwargs instead.'
        )
    if not model.dynamic_img_size:
        raise ValueError(
            'boat_fpn_backbone needs a model built with dynamic_img_size=True: detection images vary in size.'
        )
    num_stages = len(model.layers)
    out_indices = tuple(out_indices)
    if (
        not out_indices
        or list(out_indices) != sorted(set(out_indices))
        or not set(out_indices) <= set(range(num_stages))
    ):
        raise ValueError(f'out_indices must be increasing stage indices in 0..{num_stages - 1}, got {out_indices}.')
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f'out_channels must be a positive int, got {out_channels!r}.')
    if trainable_layers is not None:
        _freeze(model, trainable_layers)
    body = FeatureGetterNet(model, out_indices=out_indices)
    return BoatBackboneWithFPN(body, out_channels=out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
