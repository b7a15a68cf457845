"""What boatvit's modules do differently inside ``torch.compile`` graphs: the test for being in one, and a 2-D
convolution that a compiled CPU graph holds as one operator.

On the CPU inductor turns on its layout optimisation whenever a graph has a convolution, and gives channels-last
strides to every 4-D intermediate between the first and the last ``aten.convolution`` of the graph. BOAT's residual
stream is a ``(B, H, W, C)`` tensor, which that reads as an ``N x C x H x W`` image: with a LePE conv in every FSLA
layer up to stage 3, compiled BOAT-Swin stored it as ``(B, W, C, H)``, and every generated LayerNorm and residual
kernel read it by scalar gathers (BOAT-CSWin's LePE and patch-merging convs span its stages the same way). timm's
Swin, whose only conv is its stem, keeps ``(B, H, W, C)``. :class:`OpaqueConv2d` runs the same oneDNN conv as an
operator that inductor does not count as a convolution, so that only the stem's remains.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['in_compiled_graph', 'OpaqueConv2d']


def in_compiled_graph() -> bool:
    """Whether ``torch.compile`` is tracing for inductor (not ``torch.export``, whose graphs ONNX and other consumers
    read: those keep plain ATen ops). Eager calls, every FSLA layer's and conv's, stop at the first test."""
    return torch.compiler.is_compiling() and not (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


@torch.library.custom_op('boatvit::conv2d', mutates_args=(), device_types='cpu')
def _conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    groups: int,
) -> torch.Tensor:
    """``F.conv2d`` (dilation 1), channels-last out, as one operator of a compiled CPU graph. The operands are in one
    dtype already (:class:`OpaqueConv2d` applies autocast)."""
    with torch.autocast('cpu', enabled=False):
        out = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
    return out.contiguous(memory_format=torch.channels_last)


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, groups):
    size = [(x.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i]) // stride[i] + 1 for i in range(2)]
    return torch.empty(
        (x.shape[0], weight.shape[0], *size), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, padding, groups, bias is not None)


def _conv2d_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, groups, has_bias = ctx.conv
    needs = ctx.needs_input_grad
    grads = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        [weight.shape[0]] if has_bias else None,
        stride,
        padding,
        [1, 1],  # dilation
        False,  # transposed
        [0, 0],  # output padding
        groups,
        [needs[0], needs[1], has_bias and needs[2]],
    )
    return (*grads, None, None, None)


_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


# a leaf for torch.fx (timm's FX feature extraction), as nn.Conv2d is for torch.fx itself
@register_notrace_module
class OpaqueConv2d(nn.Conv2d):
    """``nn.Conv2d`` (dilation 1, zero padding) that is the operator ``boatvit::conv2d`` inside compiled CPU graphs
    (the same oneDNN conv and backward; channels-last out); eager calls, other devices and exported graphs run
    ``aten.convolution``. See the module docstring for why."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dilation != (1, 1) or self.padding_mode != 'zeros' or isinstance(self.padding, str):
            raise ValueError(
                'OpaqueConv2d takes dilation 1 and integer zero padding; got '
                f'dilation={self.dilation}, padding={self.padding!r}, padding_mode={self.padding_mode!r}.'
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not in_compiled_graph() or x.device.type != 'cpu':
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled('cpu'):  # as autocast casts F.conv2d's operands
            dtype = torch.get_autocast_dtype('cpu')
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        return torch.ops.boatvit.conv2d(x, weight, bias, list(self.stride), list(self.padding), self.groups)
