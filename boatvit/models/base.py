"""What both BOAT families share: a stem, four stages (downsample + bilateral blocks) in NHWC, a norm and a head;
the bilateral block skeleton (``BilateralBlock``: the FSLA branch and the residual forward) and the stage loop
(``BoatTransformer._build_stages``), so a family only supplies its stem, image-space attention and merging.

The public model API follows timm's hierarchical models (``swin_transformer.py``): ``forward_features``,
``forward_head``, ``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier``,
``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``, ``feature_info``.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ..checkpoint import load_filtered
from ..fsla import FeatureSpaceAttention

__all__ = ['BilateralBlock', 'BoatStage', 'FslaOptions', 'BoatTransformer', 'build_boat_model', 'init_weights']

FSLA_PLACEMENTS = ('shifted', 'even', 'odd', 'all', 'none')


def fsla_in_block(placement: str, index: int, shifted: bool = False) -> bool:
    """Whether block ``index`` of a stage carries a feature-space attention branch.

    ``shifted`` (BOAT-Swin's reference placement) means: the odd blocks, and only when their windows are shifted,
    which Swin turns off when the stage is no larger than the window.
    """
    if placement not in FSLA_PLACEMENTS:
        raise ValueError(f'fsla_blocks must be one of {FSLA_PLACEMENTS}, got {placement!r}.')
    return {
        'shifted': index % 2 == 1 and shifted,
        'even': index % 2 == 0,
        'odd': index % 2 == 1,
        'all': True,
        'none': False,
    }[placement]


def init_weights(module: nn.Module) -> None:
    """The reference initialisation: truncated normal (std .02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class FslaOptions:
    """The feature-space branch's settings, one object from a model's constructor to every block that carries one.

    Attributes:
        drop_path: apply the block's drop-path rate to the branch.
        scale: attention logit scale; None means ``head_dim ** -0.5``.
        cluster_size: tokens per cluster.
        overlap: sibling tokens each cluster also attends to.
        backend: the FSLA's implementation (``FeatureSpaceAttention``'s ``backend``).
    """

    drop_path: bool
    scale: Optional[float]
    cluster_size: int
    overlap: int
    backend: Optional[str] = None


class BilateralBlock(nn.Module):
    """The bilateral residual skeleton of both families, on ``(B, H, W, C)`` tensors:

    ``x + drop_path1(_attn(norm1(x)))`` (the family's image-space attention), then
    ``+ drop_path_fsla(fsla(norm_fsla(x)))`` when the block carries a feature-space branch, then
    ``+ drop_path2(mlp(norm2(x)))``.

    A family's block builds ``norm1``, ``_attn``, ``drop_path1``, ``norm2``, ``mlp`` and ``drop_path2`` (BOAT-Swin
    inherits them from timm's ``SwinTransformerBlock``) and calls ``init_fsla_branch``.
    """

    def init_fsla_branch(
        self,
        dim: int,
        num_heads: int,
        fsla: Optional[FslaOptions],
        drop_path: float,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Create ``norm_fsla``, ``fsla`` (both None when ``fsla`` is None) and ``drop_path_fsla`` (the block's
        ``drop_path`` rate when ``fsla.drop_path``, else identity)."""
        if fsla is not None:
            self.norm_fsla = nn.LayerNorm(dim, device=device, dtype=dtype)
            self.fsla = FeatureSpaceAttention(
                dim,
                num_heads,
                qkv_bias=qkv_bias,
                scale=fsla.scale,
                cluster_size=fsla.cluster_size,
                overlap=fsla.overlap,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                backend=fsla.backend,
                device=device,
                dtype=dtype,
            )
        else:
            self.norm_fsla = self.fsla = None
        use_drop_path = fsla is not None and fsla.drop_path and drop_path > 0
        self.drop_path_fsla = DropPath(drop_path) if use_drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` to ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        if self.fsla is not None:
            x = x + self.drop_path_fsla(self.fsla(self.norm_fsla(x), (H, W)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class BoatStage(nn.Module):
    """A downsampling layer (or identity) followed by a sequence of blocks, all on ``(B, H, W, C)`` tensors."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing:
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BoatTransformer(nn.Module):
    """Base of both families. Subclasses build ``patch_embed`` (image -> NHWC), then call ``_build_stages``
    (the ``layers``, ``feature_info``, ``norm`` and ``head``).
    """

    output_fmt = 'NHWC'

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]],
        in_chans: int,
        num_classes: int,
        global_pool: str,
        dynamic_img_size: bool,
        min_img_size: int,
        output_stride: Optional[int] = None,
    ):
        """``min_img_size`` is the total stride: smaller images would leave no token in the last stage.
        ``output_stride`` is timm's argument (segmentation libraries pass 8 or 16); only 32 (or None) is accepted."""
        super().__init__()
        if output_stride not in (None, 32):
            # as timm's models without dilation; dilating BOAT would change its windows, stripes and clusters,
            # so the pretrained weights would no longer compute what they were trained to
            raise ValueError(
                f'BOAT supports output_stride 32 only (no dilation), got output_stride={output_stride!r}; use a '
                'decoder that takes stride-32 features, e.g. a U-Net/FPN/UPerNet instead of DeepLabV3(+).'
            )
        self.min_img_size = min_img_size
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f'in_chans must be a positive int, got {in_chans!r}.')
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'num_classes must be a non-negative int (0 for no classifier), got {num_classes!r}.')
        self.img_size = self._check_img_size(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.dynamic_img_size = dynamic_img_size
        self.feature_info: List[Dict[str, Any]] = []

    def _check_img_size(self, img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or not all(isinstance(s, int) for s in size) or min(size) < self.min_img_size:
            raise ValueError(
                f'img_size must be an int or (height, width) of ints >= {self.min_img_size} '
                f'(the network downsamples {self.min_img_size}x), got {img_size!r}.'
            )
        return size

    def _build_stages(
        self,
        embed_dim: int,
        depths: Sequence[int],
        stem_stride: int,
        drop_path_rate: float,
        drop_rate: float,
        make_block: Callable[[int, int, int, float], nn.Module],
        make_downsample: Callable[[int, int], nn.Module],
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """The stage loop both families share: stage ``i`` has ``embed_dim * 2**i`` channels, its blocks come from
        ``make_block(stage, index, dim, drop_path)`` (drop-path linear from 0 over all blocks) and, from the second
        stage on, it starts with ``make_downsample(in_dim, out_dim)``. Then the final norm and the classifier head."""
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages = []
        dim = embed_dim
        for i, depth in enumerate(depths):
            out_dim = embed_dim * 2**i
            blocks = [make_block(i, j, out_dim, dpr[sum(depths[:i]) + j]) for j in range(depth)]
            downsample = make_downsample(dim, out_dim) if i > 0 else nn.Identity()
            stages.append(BoatStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=out_dim, reduction=stem_stride * 2**i, module=f'layers.{i}'))
            dim = out_dim
        self.layers = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.head = ClassifierHead(
            dim,
            self.num_classes,
            pool_type=self.global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            device=device,
            dtype=dtype,
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when ``x`` is not an image batch this model can take."""
        if isinstance(x, torch.fx.Proxy):
            return  # torch.fx symbolic tracing (timm's FX feature extraction): there is no value to check yet
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'expected a torch.Tensor of shape (B, {self.in_chans}, H, W), got {type(x).__name__}.')
        if x.ndim != 4:
            raise ValueError(
                f'expected a 4-D image batch (B, {self.in_chans}, H, W), got a {x.ndim}-D tensor of shape '
                f'{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) for a single image.'
            )
        if not x.is_floating_point():
            raise ValueError(
                f'expected a floating-point image tensor, got dtype {x.dtype}; convert with x.float() '
                "(and normalise with the model's mean/std)."
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f'expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); '
                f'create the model with in_chans={x.shape[1]} or convert the images.'
            )
        if x.shape[0] == 0:
            raise ValueError('got an empty batch (B = 0); pass at least one image.')
        # otherwise the first conv fails with "Input type ... and bias type ... should be the same"; autocast casts
        weight = next(self.patch_embed.parameters())  # the stem's first convolution
        if x.device != weight.device:
            raise ValueError(
                f'the images are on {x.device} but the model is on {weight.device}; move one of them '
                f'with .to({str(weight.device)!r}) or .to({str(x.device)!r}).'
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"the images are {x.dtype} but the model's weights are {weight.dtype}; convert with "
                f'x.to({weight.dtype}), or run the model under torch.autocast.'
            )
        # torch.compile: the clustering tree and the window padding are Python structure built from the token counts,
        # so a graph can only serve one image size. index() makes a symbolic size a guard on its value here, at the
        # input; left symbolic, the sizes reach the clustering, where dynamo's shape solver stalls for minutes.
        H, W = operator.index(x.shape[-2]), operator.index(x.shape[-1])
        if self.dynamic_img_size:
            if min(H, W) < self.min_img_size:
                raise ValueError(
                    f'image size {H}x{W} is too small: each side must be at least {self.min_img_size} '
                    f'pixels (the network downsamples {self.min_img_size}x).'
                )
        elif (H, W) != self.img_size:
            raise ValueError(
                f'this model was built for {self.img_size[0]}x{self.img_size[1]} images, got {H}x{W}. Create it with '
                f'dynamic_img_size=True to accept any size >= {self.min_img_size}, or with img_size=({H}, {W}), '
                'or call model.set_input_size(img_size=...).'
            )

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {n for n, _ in self.named_parameters() if 'relative_position_bias_table' in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)'
            if coarse
            else [
                (r'^layers\.(\d+).downsample', (0,)),
                (r'^layers\.(\d+)\.\w+\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'num_classes must be a non-negative int, got {num_classes!r}.')
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **get_device_dtype(self))
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (after each stage's last block, before the next patch merging and the final norm).

        Args:
            x: ``(B, in_chans, H, W)`` images.
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: apply the final norm to the last stage's output.
            stop_early: stop after the last requested stage.
            output_fmt: ``'NCHW'`` (default) or ``'NHWC'``.
            intermediates_only: return only the list.

        Returns:
            The list of ``(B, C_i, H_i, W_i)`` tensors, or ``(final features, list)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}.")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        last = len(self.layers) - 1
        intermediates = []
        x = self.patch_embed(x)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                out = self.norm(x) if norm and i == last else x
                intermediates.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else out)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` images to ``(B, H/32, W/32, num_features)`` normalised features (NHWC)."""
        self.check_input(x)
        x = self.patch_embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm calls this for ``pretrained_cfg_overlay=dict(file=PATH, custom_load=True)``: load a released checkpoint
        (either reference format; timm's own loader refuses the BOAT-Swin one) or a ``boatvit convert`` file strictly,
        without running code from it. A model created with another ``num_classes`` than its pretrained cfg keeps its
        own classifier, as timm does for fine-tuning."""
        # the family's key filter is its module's checkpoint_filter_fn (timm's convention); looked up through the
        # model's own module so that nothing here imports the family modules, which import this one
        filter_fn = sys.modules[type(self).__module__].checkpoint_filter_fn
        load_filtered(
            self,
            checkpoint_path,
            self.family,
            filter_fn,
            load_classifier=self.num_classes == self.pretrained_cfg.get('num_classes'),
        )


def boat_cfg(crop_pct: float, **kwargs: Any) -> Dict[str, Any]:
    """A BOAT model's timm pretrained cfg: what both families share, ``crop_pct`` (their evaluations differ) and
    ``kwargs`` on top."""
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': crop_pct,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2201.13027',
        'paper_name': 'BOAT: Bilateral Local Attention Vision Transformer',
        'origin_url': 'https://github.com/mahaoyuHKU/pytorch-boat',
        **kwargs,
    }


def build_boat_model(
    model_cls: type,
    variant: str,
    pretrained: bool,
    checkpoint_filter_fn: Callable,
    default_depths: Tuple[int, ...],
    **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a BOAT family, with ``features_only`` served by
    ``forward_intermediates`` (NCHW maps) and a ``pretrained_cfg`` that tells whether the input size is fixed."""
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', default_depths)))))
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )
    if isinstance(model, BoatTransformer):
        model.pretrained_cfg = model.default_cfg = dict(
            model.pretrained_cfg, fixed_input_size=not model.dynamic_img_size
        )
    return model
