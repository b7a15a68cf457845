"""BOAT-Swin: Swin Transformer with feature-space local attention (Yu et al., BOAT, arXiv 2201.13027).

Built from timm's Swin pieces (``PatchEmbed``, ``PatchMerging``, ``SwinTransformerBlock``): a bilateral block is a
timm Swin block with one more residual branch, ``x = x + fsla(norm_fsla(x))``, between the (shifted-)window
attention and the MLP. Reference: ``BOAT-Swin/models/boat_swin_transformer.py`` of mahaoyuHKU/pytorch-boat.
Where the FSLA sits (``fsla_blocks='shifted'``: odd blocks of stages larger than the window), its lack of
drop-path (``fsla_drop_path=False``) and its scale (``fsla_scale=None``, i.e. head_dim^-0.5) follow the released
weights.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resize_rel_pos_bias_table
from timm.models import generate_default_cfgs, register_model
from timm.models._input import update_model_input_size
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformerBlock,
    calc_stage_window_sizes,
    resolve_stage_window_sizes,
)

from .base import BilateralBlock, BoatTransformer, FslaOptions, boat_cfg, build_boat_model, fsla_in_block, init_weights

__all__ = ['BilateralSwinBlock', 'BoatSwinTransformer', 'ConvPatchStem']

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


class BilateralSwinBlock(BilateralBlock, SwinTransformerBlock):
    """timm's Swin block plus an optional feature-space attention branch before the MLP.

    ``x + W-MSA(norm1(x))``, then ``+ FSLA(norm_fsla(x))`` when ``fsla`` is given, then ``+ MLP(norm2(x))``
    (``BilateralBlock.forward``).
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        num_heads: int,
        window_size: Tuple[int, int],
        shift_size: int | Tuple[int, int],
        fsla: Optional[FslaOptions],
        dynamic_mask: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(
            dim=dim,
            input_resolution=input_resolution,
            num_heads=num_heads,
            window_size=window_size,
            shift_size=shift_size,
            dynamic_mask=dynamic_mask,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            drop_path=drop_path,
            device=device,
            dtype=dtype,
        )
        self.init_fsla_branch(dim, num_heads, fsla, drop_path, qkv_bias, attn_drop, proj_drop, device, dtype)


class ConvPatchStem(nn.Sequential):
    """A convolutional patch stem: a 3x3 convolution at full resolution, then one 3x3 stride-2 convolution per halving
    down to the patch grid, BatchNorm and GELU between them; NCHW image to NCHW patch grid (``stem='conv'``, in
    place of ``PatchEmbed``'s one patch-sized convolution, whose padding and LayerNorm it keeps).

    Why: a patch-sized convolution sees each patch alone, and a small transformer trained from scratch spends its
    first epochs learning the local filters a few convolutions start with (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"). On CIFAR-10 it lifts `boat_swin_nano_32`'s top-1 after a short run by about three
    points for 7 % of its training throughput (benchmarks/RESULTS.md, "Real photos").
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"stem='conv' needs a patch_size that is a power of two, at least 2; got {patch_size}.")
        dd = {'device': device, 'dtype': dtype}
        width = embed_dim * 3 // 4
        layers = [nn.Conv2d(in_chans, width, 3, padding=1, bias=False, **dd), nn.BatchNorm2d(width, **dd), nn.GELU()]
        halvings = patch_size.bit_length() - 1
        for _ in range(halvings - 1):
            layers += [
                nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(width, **dd),
                nn.GELU(),
            ]
        layers.append(nn.Conv2d(width, embed_dim, 3, stride=2, padding=1, **dd))
        super().__init__(*layers)


class BoatSwinTransformer(BoatTransformer):
    """BOAT-Swin: a 4x patch stem, four stages of bilateral Swin blocks joined by patch merging."""

    family = 'swin'

    def __init__(
        self,
        img_size: _int_or_tuple_2_t = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = 'avg',
        embed_dim: int = 96,
        depths: Tuple[int, ...] = (2, 2, 6, 2),
        num_heads: Tuple[int, ...] = (3, 6, 12, 24),
        window_size: Union[_int_or_tuple_2_t, Sequence[_int_or_tuple_2_t]] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        dynamic_img_size: bool = False,
        stem: str = 'patch',
        fsla_blocks: str = 'shifted',
        fsla_drop_path: bool = False,
        fsla_scale: Optional[float] = None,
        fsla_cluster_size: int = 49,
        fsla_overlap: int = 20,
        fsla_backend: Optional[str] = None,
        output_stride: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            img_size: input size the model is built for (sets the Swin masks and, through the stage sizes, which
                blocks get FSLA); any size works per call with ``dynamic_img_size=True``.
            patch_size: stem patch size (4).
            in_chans: image channels.
            num_classes: classifier outputs, 0 for none.
            global_pool: ``'avg'`` or ``''``.
            embed_dim: channels of stage 1; doubled at each stage.
            depths: blocks per stage.
            num_heads: heads per stage.
            window_size: Swin window, an int or (h, w) for all stages or one per stage.
            mlp_ratio: MLP hidden width over dim.
            qkv_bias: bias in the qkv projections (window and feature-space attention).
            drop_rate: dropout before the classifier.
            proj_drop_rate: dropout after attention projections and in the MLP.
            attn_drop_rate: attention-weight dropout.
            drop_path_rate: stochastic depth, linear from 0 over all blocks.
            dynamic_img_size: accept any input size >= 32 per call (masks and padding computed per call).
            stem: ``'patch'`` (Swin's and the reference's: one patch-sized convolution) or ``'conv'``
                (`ConvPatchStem`: 3x3 convolutions, for small models trained from scratch).
            fsla_blocks: which blocks carry FSLA: ``'shifted'`` (reference: odd blocks of stages larger than the
                window, so stage 4 at 224 has none), ``'odd'``, ``'even'``, ``'all'`` or ``'none'``.
            fsla_drop_path: apply drop-path to the FSLA branch (the reference does not for BOAT-Swin).
            fsla_scale: FSLA attention scale; None means head_dim^-0.5 (reference).
            fsla_cluster_size: tokens per FSLA cluster (49).
            fsla_overlap: sibling tokens each cluster also attends to (20).
            fsla_backend: the FSLA's implementation (``FeatureSpaceAttention``'s ``backend``): its kernels or not;
                None follows the ``BOATVIT_CPU_KERNEL`` default.
            output_stride: timm's feature stride argument; only 32 (or None): BOAT has no dilated variant.
            device, dtype: where and in which dtype every parameter and buffer is created (timm's factory
                arguments; ``device='meta'`` builds without memory, then ``to_empty`` and load a state dict).
        """
        num_stages = len(depths)
        super().__init__(
            img_size,
            in_chans,
            num_classes,
            global_pool,
            dynamic_img_size,
            min_img_size=patch_size * 2 ** (num_stages - 1),
            output_stride=output_stride,
        )
        dd = {'device': device, 'dtype': dtype}
        if len(num_heads) != num_stages:
            raise ValueError(f'depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length.')
        fsla_in_block(fsla_blocks, 0)  # validates the name
        if stem not in ('patch', 'conv'):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}.")
        for i, heads in enumerate(num_heads):
            if embed_dim * 2**i % heads:
                raise ValueError(f'stage {i} has {embed_dim * 2**i} channels, not divisible by num_heads[{i}]={heads}.')
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(
            img_size=self.img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            # what timm reads as fixed_input_size; check_input has already refused other sizes with a clearer message
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=True,
            output_fmt='NHWC',
            **dd,
        )
        if stem == 'conv':
            self.patch_embed.proj = ConvPatchStem(in_chans, embed_dim, patch_size, **dd)
        grid = self.patch_embed.grid_size
        fsla = FslaOptions(fsla_drop_path, fsla_scale, fsla_cluster_size, fsla_overlap, fsla_backend)
        windows = resolve_stage_window_sizes(window_size, num_stages)
        self._ref_window_sizes = windows
        self._ref_grid_size = tuple(grid)

        def make_block(i: int, j: int, dim: int, drop_path: float) -> BilateralSwinBlock:
            resolution = tuple((g + 2**i - 1) // 2**i for g in grid)
            shifted = any(r > w for r, w in zip(resolution, windows[i]))  # Swin shifts only stages above the window
            return BilateralSwinBlock(
                dim=dim,
                input_resolution=resolution,
                num_heads=num_heads[i],
                window_size=windows[i],
                shift_size=0 if j % 2 == 0 else tuple(w // 2 for w in windows[i]),
                fsla=fsla if fsla_in_block(fsla_blocks, j, shifted) else None,
                dynamic_mask=dynamic_img_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path,
                **dd,
            )

        self._build_stages(
            embed_dim,
            depths,
            patch_size,
            drop_path_rate,
            drop_rate,
            make_block,
            lambda dim, out_dim: PatchMerging(dim=dim, out_dim=out_dim, **dd),
            **dd,
        )
        self.apply(init_weights)

    def set_input_size(
        self,
        img_size: Optional[_int_or_tuple_2_t] = None,
        window_size: Optional[Union[_int_or_tuple_2_t, Sequence[_int_or_tuple_2_t]]] = None,
    ) -> None:
        """Rebuild masks, windows and relative position tables for a new input size.

        Without ``window_size`` each stage's window scales with the patch grid (timm's rule), so a 224 model set to
        448 gets 14x14 windows. Which blocks carry FSLA does not change: that is part of the weights.
        """
        if img_size is not None:
            self.img_size = self._check_img_size(img_size)
            self.patch_embed.set_input_size(img_size=self.img_size)
        grid = tuple(self.patch_embed.grid_size)
        windows = calc_stage_window_sizes(grid, self._ref_window_sizes, self._ref_grid_size, window_size=window_size)
        if window_size is not None:
            self._ref_window_sizes, self._ref_grid_size = windows, grid
        for i, stage in enumerate(self.layers):
            resolution = tuple((g + 2**i - 1) // 2**i for g in grid)
            for block in stage.blocks:
                block.set_input_size(feat_size=resolution, window_size=windows[i])
        # what timm's save_for_hf writes as model_args, so a reloaded model is built at this size with these windows
        update_model_input_size(self, self.img_size, window_size=windows)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: BoatSwinTransformer) -> Dict[str, torch.Tensor]:
    """Map reference BOAT-Swin keys to boatvit's (boatvit keys pass through) and fit position tables to the model.

    Reference layout: patch merging at the end of a stage (boatvit, like timm: at the start of the next),
    ``attnC``/``norm4`` for the FSLA branch, ``get_v`` for its LePE conv, a bare ``head`` Linear. The Swin buffers
    ``relative_position_index`` and ``attn_mask`` are rebuilt by the model and dropped here.
    """
    reference = 'head.weight' in state_dict or any('.attnC.' in k for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        if reference:
            k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', k)
            k = k.replace('.attnC.get_v.', '.fsla.lepe.').replace('.attnC.', '.fsla.').replace('.norm4.', '.norm_fsla.')
            k = re.sub(r'^head\.', 'head.fc.', k)
        if k.endswith('relative_position_bias_table'):
            attn = model.get_submodule(k[: -len('.relative_position_bias_table')])
            if v.shape != attn.relative_position_bias_table.shape:
                v = resize_rel_pos_bias_table(
                    v, new_window_size=attn.window_size, new_bias_shape=attn.relative_position_bias_table.shape
                )
        out[k] = v
    return out


def _create_boat_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> BoatSwinTransformer:
    return build_boat_model(BoatSwinTransformer, variant, pretrained, checkpoint_filter_fn, (2, 2, 6, 2), **kwargs)


def _cfg(crop_pct: float = 0.875, **kwargs: Any) -> Dict[str, Any]:
    # 0.875: the reference evaluation, resize to 256 and centre crop 224 (BOAT-Swin data/build.py)
    return boat_cfg(crop_pct, **kwargs)


def _nano_cfg(**kwargs: Any) -> Dict[str, Any]:
    return _cfg(
        input_size=(3, 32, 32),
        pool_size=(2, 2),
        num_classes=10,
        crop_pct=1.0,
        interpolation='bilinear',
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        origin_url='',
        notes=('no released weights',),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        # released weights cannot be fetched automatically: pass pretrained_cfg_overlay=dict(file=PATH) with a
        # `boatvit convert` output, or dict(file=PATH, custom_load=True) with the downloaded file itself
        'boat_swin_tiny_224.in1k': _cfg(notes=('released file: https://www.dropbox.com/s/xa94uewsrvjglnn/tiny.pth',)),
        'boat_swin_small_224.in1k': _cfg(notes=('released file: https://www.dropbox.com/s/7ih1zvii3bvdcgd/small.pth',)),
        'boat_swin_base_224.in1k': _cfg(notes=('released file: https://www.dropbox.com/s/70hr7h0smcr0gr9/base.pth',)),
        # boatvit's own small model for small images (the embedded digits demo); no released weights
        'boat_swin_nano_32.untrained': _nano_cfg(),
        # the same with a convolutional stem: what `boatvit train --data DIR` trains from scratch
        'boat_swin_nano_convstem_32.untrained': _nano_cfg(first_conv='patch_embed.proj.0'),
    }
)


@register_model
def boat_swin_tiny_224(pretrained: bool = False, **kwargs: Any) -> BoatSwinTransformer:
    """BOAT-Swin-T (30.27 M parameters at 1000 classes)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_boat_swin('boat_swin_tiny_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def boat_swin_small_224(pretrained: bool = False, **kwargs: Any) -> BoatSwinTransformer:
    """BOAT-Swin-S (55.16 M parameters)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_boat_swin('boat_swin_small_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def boat_swin_base_224(pretrained: bool = False, **kwargs: Any) -> BoatSwinTransformer:
    """BOAT-Swin-B (97.61 M parameters)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_boat_swin('boat_swin_base_224', pretrained=pretrained, **dict(model_args, **kwargs))


_NANO_ARGS = dict(
    img_size=32,
    patch_size=2,
    window_size=4,
    embed_dim=32,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8),
    num_classes=10,
    drop_path_rate=0.0,
)


@register_model
def boat_swin_nano_32(pretrained: bool = False, **kwargs: Any) -> BoatSwinTransformer:
    """A 2.3 M-parameter BOAT-Swin for 32x32 images: patch 2, window 4, FSLA in stages 1 and 2."""
    return _create_boat_swin('boat_swin_nano_32', pretrained=pretrained, **dict(_NANO_ARGS, **kwargs))


@register_model
def boat_swin_nano_convstem_32(pretrained: bool = False, **kwargs: Any) -> BoatSwinTransformer:
    """`boat_swin_nano_32` with a convolutional stem (`ConvPatchStem`): photos trained from scratch learn faster."""
    model_args = dict(_NANO_ARGS, stem='conv')
    return _create_boat_swin('boat_swin_nano_convstem_32', pretrained=pretrained, **dict(model_args, **kwargs))
