"""Convolutions that keep only what the gradient with respect to their input needs.

PyTorch's convolution saves its input for the weight's gradient, even when only the input's gradient is
asked for. Saliency never asks for weight gradients, so under `input_gradients_only()` every convolution
(plain or transposed, 1-3D) saves just its weight. In nnU-Net's U-Net most convolution inputs are also kept
by the preceding activation, but the decoder's concatenated skip connections are not: at the CPU plan's
64^3 tile they are a fifth of one tile's graph (111 MB without this, 86 MB with it). Input gradients are
bit-identical; weight and bias get no gradient inside the block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _ntuple
from torch.overrides import TorchFunctionMode

_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
_CONVOLUTION_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_PARAMETERS = {
    **{convolution: _CONVOLUTION_PARAMETERS for convolution in (F.conv1d, F.conv2d, F.conv3d)},
    **{convolution: _TRANSPOSED_PARAMETERS
       for convolution in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
}


class _InputGradientConvolution(torch.autograd.Function):
    """`convolution` (a torch.nn.functional convolution) whose backward returns the input's gradient only."""

    @staticmethod
    def forward(ctx, input, weight, bias, convolution, arguments):
        ctx.save_for_backward(weight)
        ctx.input_shape = input.shape
        ctx.geometry = _geometry(convolution, arguments, input.dim() - 2)
        return convolution(input, weight, bias, **arguments)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        shape_only = weight.new_empty(1, dtype=grad_output.dtype).expand(ctx.input_shape)
        grad_input = torch.ops.aten.convolution_backward(grad_output, shape_only, weight.to(grad_output.dtype), None,
                                                         *ctx.geometry, (True, False, False))[0]
        return grad_input, None, None, None, None


def _geometry(convolution, arguments: dict, dims: int) -> tuple:
    """aten.convolution_backward's (stride, padding, dilation, transposed, output_padding, groups)."""
    expand = _ntuple(dims)
    transposed = _PARAMETERS[convolution] is _TRANSPOSED_PARAMETERS
    output_padding = list(expand(arguments["output_padding"])) if transposed else [0] * dims
    return (list(expand(arguments["stride"])), list(expand(arguments["padding"])), list(expand(arguments["dilation"])),
            transposed, output_padding, arguments["groups"])


class _InputGradientsMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names = _PARAMETERS.get(func)
        if names is None or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        bound = {**_DEFAULTS, **dict(zip(names, args)), **kwargs}
        if isinstance(bound["padding"], str):  # "same"/"valid": leave to PyTorch
            return func(*args, **kwargs)
        arguments = {name: bound[name] for name in names[3:]}
        return _InputGradientConvolution.apply(bound["input"], bound["weight"], bound["bias"], func, arguments)


def input_gradients_only() -> TorchFunctionMode:
    """A context inside which convolutions save only their weights: input gradients at less memory."""
    return _InputGradientsMode()
