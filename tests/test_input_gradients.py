"""Convolutions that save only their weights: same input gradients, smaller graphs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnxai.attribution.engine import saved_graph_bytes
from nnxai.attribution.input_gradients import input_gradients_only
from tests.conftest import tiny_unet
from tests.torch_threads import one_torch_thread  # noqa: F401


def _input_gradient(function, x: torch.Tensor, grad_output: torch.Tensor | None = None,
                    lean: bool = False) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    if lean:
        with input_gradients_only():
            out = function(x)
    else:
        out = function(x)
    return torch.autograd.grad(out, x, torch.ones_like(out) if grad_output is None else grad_output)[0]


def test_unet_input_gradient_is_bit_identical_and_conv_inputs_are_not_saved():
    network = tiny_unet(seed=3)
    x = torch.randn(1, 2, 16, 16, 16)
    grad_output = torch.randn(1, 2, 16, 16, 16)
    assert torch.equal(_input_gradient(network, x, grad_output, lean=True), _input_gradient(network, x, grad_output))

    conv_input_bytes = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: conv_input_bytes.append(args[0].nbytes))
             for m in network.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    with saved_graph_bytes() as plain:
        network(x.clone().requires_grad_(True))
    for hook in hooks:
        hook.remove()
    with saved_graph_bytes() as lean, input_gradients_only():
        network(x.clone().requires_grad_(True))
    # inputs of: 2 encoder convs, the transposed conv, the decoder conv (the concatenated skip), the head
    assert conv_input_bytes == [n * x[0, 0].nbytes for n in (2, 4, 1, 8, 4)]  # in single-channel volumes
    # the activations' inputs stay saved by the activations; the network input and the concatenation go
    assert plain[0] - lean[0] == conv_input_bytes[0] + conv_input_bytes[3]


@pytest.mark.parametrize("function, shape", [
    (lambda x, w: F.conv3d(x, w, None, 2, 1, 1, 1), (1, 4, 9, 8, 7)),
    (lambda x, w: F.conv3d(x, w, bias=torch.ones(6), stride=(1, 2, 1), padding=2, dilation=2), (2, 4, 9, 8, 7)),
    (lambda x, w: F.conv2d(x, w[:, :2, 0], groups=2, padding=(1, 0)), (1, 4, 9, 8)),
    (lambda x, w: F.conv1d(x, w[..., 0, 0], stride=2), (1, 4, 11)),
    (lambda x, w: F.conv_transpose3d(x, w, None, 2, 1, 1), (1, 6, 5, 4, 3)),
    (lambda x, w: F.conv_transpose2d(x, w[..., 0], stride=(2, 3), output_padding=(1, 2),
                                     dilation=1), (1, 6, 5, 4)),
])
def test_every_convolution_form_gives_the_plain_input_gradient(function, shape):
    weight = torch.randn(6, 4, 3, 3, 3)
    x = torch.randn(shape)
    lean = _input_gradient(lambda v: function(v, weight), x, lean=True)
    torch.testing.assert_close(lean, _input_gradient(lambda v: function(v, weight), x), rtol=1e-6, atol=1e-6)


def test_string_padding_and_no_grad_pass_through():
    weight = torch.randn(3, 2, 3, 3, 3)
    x = torch.randn(1, 2, 6, 6, 6)
    same = _input_gradient(lambda v: F.conv3d(v, weight, padding="same"), x, lean=True)
    assert torch.equal(same, _input_gradient(lambda v: F.conv3d(v, weight, padding="same"), x))
    with torch.no_grad(), input_gradients_only():
        assert torch.equal(F.conv3d(x, weight), F.conv3d(x, weight))


def test_batched_backward_and_autocast_match_plain_autograd():
    network = tiny_unet(seed=4)
    x = torch.randn(1, 2, 16, 16, 16)
    targets = torch.randn(3, 1, 2, 16, 16, 16)

    def batched(lean: bool) -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        with input_gradients_only() if lean else torch.enable_grad():
            out = network(leaf)
        return torch.autograd.grad(out, leaf, targets, is_grads_batched=True)[0]

    assert torch.equal(batched(lean=True), batched(lean=False))

    def bf16(v: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return network(v).float()

    assert torch.equal(_input_gradient(bf16, x, lean=True), _input_gradient(bf16, x))


def test_weights_get_no_gradient_inside():
    conv = nn.Conv3d(2, 3, 3)
    with input_gradients_only():
        out = conv(torch.randn(1, 2, 5, 5, 5, requires_grad=True))
    out.sum().backward()
    assert conv.weight.grad is None and conv.bias.grad is None
