"""BOAT-CSWin: CSWin Transformer with feature-space local attention (Yu et al., BOAT, arXiv 2201.13027).

timm has no CSWin, so its pieces are written here: the 7x7 stride-4 conv stem, cross-shaped window attention
(half the heads over vertical stripes, half over horizontal ones, each with a LePE depthwise conv on V inside the
stripe; one global branch in the last stage) and 3x3 stride-2 conv merging. Reference:
``BOAT-CSWin/models/cswin_boat.py`` of mahaoyuHKU/pytorch-boat. As there, FSLA sits in the even blocks of every
stage with drop-path, and its attention scale is 1.0 (``fsla_scale=1.0``): the reference passes
``qk_scale=qkv_bias`` (True) to it, and the released weights were trained that way.

Differences from the reference, all invisible at 224 and 448: any input size (stripes are padded and the padding
masked out, the stem does not fix the size), and the block structure never depends on the input size (the
reference turns a stage whose resolution equals the stripe size into a single global branch).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from timm.models._input import update_model_input_size

from ..compiled_graphs import OpaqueConv2d
from ..fsla import LePEConv
from .base import BilateralBlock, BoatTransformer, FslaOptions, boat_cfg, build_boat_model, fsla_in_block, init_weights

__all__ = ['stripe_attention', 'CrossShapedWindowAttention', 'BilateralCSWinBlock', 'BoatCSWinTransformer']


def stripe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stripe: Tuple[int, int],
    num_heads: int,
    lepe: nn.Module,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention inside non-overlapping ``stripe`` windows, plus LePE on V inside each window.

    Args:
        q, k, v: ``(B, H, W, C)``.
        stripe: ``(h, w)`` window; a side larger than the image is clamped to it. Images that do not divide into
            windows are zero-padded, and the padded keys are masked out.
        num_heads: heads over the C channels.
        lepe: depthwise conv applied to each V window ``(B * windows, C, h, w)``, zero-padded at its borders.
        dropout_p: attention dropout.

    Returns:
        ``(B, H, W, C)``.
    """
    B, H, W, C = q.shape
    sh, sw = min(stripe[0], H), min(stripe[1], W)
    pad_h, pad_w = -H % sh, -W % sw
    if pad_h or pad_w:
        q, k, v = (F.pad(t, (0, 0, 0, pad_w, 0, pad_h)) for t in (q, k, v))
    Hp, Wp = H + pad_h, W + pad_w
    d = C // num_heads
    area = sh * sw

    def to_windows(t: torch.Tensor) -> torch.Tensor:  # (B, Hp, Wp, c) -> (B * nW, area, c)
        c = t.shape[-1]
        return t.view(B, Hp // sh, sh, Wp // sw, sw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, area, c)

    def to_heads(t: torch.Tensor) -> torch.Tensor:  # (B * nW, area, C) -> (B * nW, heads, area, d)
        return t.view(-1, area, num_heads, d).transpose(1, 2)

    qw, kw, vw = (to_windows(t) for t in (q, k, v))
    # each V window is an NHWC image: the depthwise conv takes it as a channels-last NCHW view, no copy
    pos = to_heads(lepe(vw.view(-1, sh, sw, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(-1, area, C))
    mask = None
    if pad_h or pad_w:
        real = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=q.device)
        real[:, :H, :W] = True
        mask = to_windows(real.expand(B, -1, -1, -1)).view(-1, 1, 1, area)
    out = (
        F.scaled_dot_product_attention(to_heads(qw), to_heads(kw), to_heads(vw), attn_mask=mask, dropout_p=dropout_p)
        + pos
    )
    out = out.transpose(1, 2).reshape(B, Hp // sh, Wp // sw, sh, sw, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, Hp, Wp, C)[:, :H, :W]


# a leaf for torch.fx (timm's FX feature extraction): the stripe padding is Python arithmetic on the grid size
@register_notrace_module
class CrossShapedWindowAttention(nn.Module):
    """CSWin's attention: one qkv projection; the channels split in two branches, vertical stripes of width
    ``split_size`` and horizontal stripes of height ``split_size``, each with half the heads and its own LePE;
    with ``global_attention`` one branch over the whole image (CSWin's last stage). Then ``proj``.

    Keys: ``qkv``, ``proj``, ``lepe.{0,1}`` (reference: the block's ``qkv``/``proj`` and ``attns.{i}.get_v``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        global_attention: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        branches = 1 if global_attention else 2
        if dim % num_heads or num_heads % branches:
            raise ValueError(f'dim={dim} and num_heads={num_heads} must split evenly into {branches} branch(es).')
        self.num_heads = num_heads
        self.split_size = split_size
        self.global_attention = global_attention
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        branch_dim = dim // branches
        self.lepe = nn.ModuleList([LePEConv(branch_dim, **dd) for _ in range(branches)])
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` to ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.global_attention:
            out = stripe_attention(q, k, v, (H, W), self.num_heads, self.lepe[0], dropout_p)
        else:
            half, heads, s = C // 2, self.num_heads // 2, self.split_size
            out = torch.cat(
                [
                    stripe_attention(
                        q[..., :half], k[..., :half], v[..., :half], (H, s), heads, self.lepe[0], dropout_p
                    ),
                    stripe_attention(
                        q[..., half:], k[..., half:], v[..., half:], (s, W), heads, self.lepe[1], dropout_p
                    ),
                ],
                dim=-1,
            )
        return self.proj_drop(self.proj(out))


class BilateralCSWinBlock(BilateralBlock):
    """``x + CSWin-attn(norm1(x))``, then ``+ FSLA(norm_fsla(x))`` when ``fsla`` is given, then ``+ MLP(norm2(x))``
    (``BilateralBlock.forward``), every branch with the block's drop-path (the FSLA one only when
    ``fsla.drop_path``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        global_attention: bool,
        fsla: Optional[FslaOptions],
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = CrossShapedWindowAttention(
            dim,
            num_heads,
            split_size,
            global_attention,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # the reference passes attn_drop as the FSLA's output dropout too
        self.init_fsla_branch(dim, num_heads, fsla, drop_path, qkv_bias, attn_drop, attn_drop, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """The image-space branch ``BilateralBlock.forward`` calls (timm's Swin block names its own ``_attn``)."""
        return self.attn(x)


class ConvStem(nn.Module):
    """CSWin's stem: 7x7 stride-4 conv (padding 2), then LayerNorm; NCHW image to NHWC tokens."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=2, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvMerging(nn.Module):
    """CSWin's patch merging: 3x3 stride-2 conv (padding 1), then LayerNorm; NHWC in and out."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        # an operator inside compiled CPU graphs, as the LePE convs: see boatvit.compiled_graphs
        self.conv = OpaqueConv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class BoatCSWinTransformer(BoatTransformer):
    """BOAT-CSWin: a 7x7 conv stem, four stages of bilateral CSWin blocks joined by conv merging."""

    family = 'cswin'

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = 'avg',
        embed_dim: int = 64,
        depths: Tuple[int, ...] = (1, 2, 21, 1),
        num_heads: Tuple[int, ...] = (2, 4, 8, 16),
        split_size: Tuple[int, ...] = (1, 2, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        dynamic_img_size: bool = False,
        fsla_blocks: str = 'even',
        fsla_drop_path: bool = True,
        fsla_scale: Optional[float] = 1.0,
        fsla_cluster_size: int = 49,
        fsla_overlap: int = 20,
        fsla_backend: Optional[str] = None,
        output_stride: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            img_size: nominal input size; any size works per call with ``dynamic_img_size=True`` (nothing in the
                network depends on it).
            in_chans: image channels.
            num_classes: classifier outputs, 0 for none.
            global_pool: ``'avg'`` or ``''``.
            embed_dim: channels of stage 1; doubled at each stage.
            depths: blocks per stage.
            num_heads: heads per stage (even, except the last stage's).
            split_size: stripe width per stage; the last stage attends globally and ignores it.
            mlp_ratio: MLP hidden width over dim.
            qkv_bias: bias in the qkv projections.
            drop_rate: dropout before the classifier.
            proj_drop_rate: dropout after the attention projection and in the MLP.
            attn_drop_rate: attention-weight dropout (also the FSLA's output dropout, as in the reference).
            drop_path_rate: stochastic depth, linear from 0 over all blocks.
            dynamic_img_size: accept any input size >= 32 per call.
            fsla_blocks: which blocks carry FSLA: ``'even'`` (reference: 1st, 3rd, ... of every stage), ``'odd'``,
                ``'all'`` or ``'none'``.
            fsla_drop_path: apply the block's drop-path to the FSLA branch (reference: yes).
            fsla_scale: FSLA attention scale; the reference's is 1.0 (an argument-order accident its weights
                depend on); None means head_dim^-0.5, as the paper's attention.
            fsla_cluster_size: tokens per FSLA cluster (49).
            fsla_overlap: sibling tokens each cluster also attends to (20).
            fsla_backend: the FSLA's implementation (``FeatureSpaceAttention``'s ``backend``): its kernels or not;
                None follows the ``BOATVIT_CPU_KERNEL`` default.
            output_stride: timm's feature stride argument; only 32 (or None): BOAT has no dilated variant.
            device, dtype: where and in which dtype every parameter is created (timm's factory arguments;
                ``device='meta'`` builds without memory, then ``to_empty`` and load a state dict).
        """
        num_stages = len(depths)
        super().__init__(
            img_size,
            in_chans,
            num_classes,
            global_pool,
            dynamic_img_size,
            min_img_size=4 * 2 ** (num_stages - 1),
            output_stride=output_stride,
        )
        dd = {'device': device, 'dtype': dtype}
        if not len(num_heads) == len(split_size) == num_stages:
            raise ValueError(
                f'depths {tuple(depths)}, num_heads {tuple(num_heads)} and split_size '
                f'{tuple(split_size)} must have the same length.'
            )
        if not all(isinstance(s, int) and s > 0 for s in split_size):
            raise ValueError(f'split_size must be positive ints (stripe widths), got {tuple(split_size)}.')
        if fsla_blocks == 'shifted':
            raise ValueError(
                "fsla_blocks='shifted' is BOAT-Swin's placement; BOAT-CSWin takes 'even', 'odd', 'all' or 'none'."
            )
        fsla_in_block(fsla_blocks, 0)  # validates the name
        self.patch_embed = ConvStem(in_chans, embed_dim, **dd)
        fsla = FslaOptions(fsla_drop_path, fsla_scale, fsla_cluster_size, fsla_overlap, fsla_backend)

        def make_block(i: int, j: int, dim: int, drop_path: float) -> BilateralCSWinBlock:
            return BilateralCSWinBlock(
                dim=dim,
                num_heads=num_heads[i],
                split_size=split_size[i],
                global_attention=i == num_stages - 1,
                fsla=fsla if fsla_in_block(fsla_blocks, j) else None,
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
            4,
            drop_path_rate,
            drop_rate,
            make_block,
            lambda dim, out_dim: ConvMerging(dim, out_dim, **dd),
            **dd,
        )
        self.apply(init_weights)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Set the nominal input size (checked when ``dynamic_img_size`` is off); no weights change."""
        if img_size is not None:
            self.img_size = self._check_img_size(img_size)
            update_model_input_size(self, self.img_size)  # what timm's save_for_hf writes as model_args


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: BoatCSWinTransformer) -> Dict[str, torch.Tensor]:
    """Map reference BOAT-CSWin keys to boatvit's; boatvit keys pass through unchanged.

    ``stage1_conv_embed.{0,2}`` -> ``patch_embed.{proj,norm}``, ``merge{i}`` -> ``layers.{i}.downsample``,
    ``stage{s}.{j}`` -> ``layers.{s-1}.blocks.{j}`` with ``qkv``/``proj`` -> ``attn.*``, ``attns.{i}.get_v`` ->
    ``attn.lepe.{i}``, ``content_attn`` -> ``fsla`` (``get_v`` -> ``lepe``), ``norm3`` -> ``norm_fsla``, and
    ``head`` -> ``head.fc``.
    """
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stage1_conv_embed\.0\.', 'patch_embed.proj.', k)
        k = re.sub(r'^stage1_conv_embed\.2\.', 'patch_embed.norm.', k)
        k = re.sub(r'^merge(\d+)\.', lambda m: f'layers.{m.group(1)}.downsample.', k)
        block = re.match(r'^stage(\d+)\.(\d+)\.(.*)$', k)
        if block:
            stage, index, rest = int(block.group(1)) - 1, block.group(2), block.group(3)
            rest = re.sub(r'^(qkv|proj)\.', r'attn.\1.', rest)
            rest = re.sub(r'^attns\.(\d+)\.get_v\.', r'attn.lepe.\1.', rest)
            rest = rest.replace('content_attn.get_v.', 'fsla.lepe.').replace('content_attn.', 'fsla.')
            rest = re.sub(r'^norm3\.', 'norm_fsla.', rest)
            k = f'layers.{stage}.blocks.{index}.{rest}'
        k = re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', k)
        out[k] = v
    return out


def _create_boat_cswin(variant: str, pretrained: bool = False, **kwargs: Any) -> BoatCSWinTransformer:
    return build_boat_model(BoatCSWinTransformer, variant, pretrained, checkpoint_filter_fn, (1, 2, 21, 1), **kwargs)


def _cfg(crop_pct: float = 0.9, **kwargs: Any) -> Dict[str, Any]:
    return boat_cfg(crop_pct, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        # released EMA weights; load them as the BOAT-Swin comment says
        'boat_cswin_tiny_224.in1k': _cfg(
            notes=('released file: https://www.dropbox.com/s/rsmtu6r0v2lt0y5/cswin_tiny.pth.tar',)
        ),
        'boat_cswin_small_224.in1k': _cfg(
            notes=('released file: https://www.dropbox.com/s/cnl00d1faxxoi19/cswin_small.pth.tar',)
        ),
        'boat_cswin_base_224.in1k': _cfg(
            notes=('released file: https://www.dropbox.com/s/92sr8r8zhng1mqg/cswin_base.pth.tar',)
        ),
    }
)


@register_model
def boat_cswin_tiny_224(pretrained: bool = False, **kwargs: Any) -> BoatCSWinTransformer:
    """BOAT-CSWin-T (26.39 M parameters)."""
    model_args = dict(embed_dim=64, depths=(1, 2, 21, 1), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16))
    return _create_boat_cswin('boat_cswin_tiny_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def boat_cswin_small_224(pretrained: bool = False, **kwargs: Any) -> BoatCSWinTransformer:
    """BOAT-CSWin-S (40.11 M parameters)."""
    model_args = dict(embed_dim=64, depths=(2, 4, 32, 2), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16))
    return _create_boat_cswin('boat_cswin_small_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def boat_cswin_base_224(pretrained: bool = False, **kwargs: Any) -> BoatCSWinTransformer:
    """BOAT-CSWin-B (89.63 M parameters)."""
    model_args = dict(embed_dim=96, depths=(2, 4, 32, 2), split_size=(1, 2, 7, 7), num_heads=(4, 8, 16, 32))
    return _create_boat_cswin('boat_cswin_base_224', pretrained=pretrained, **dict(model_args, **kwargs))
