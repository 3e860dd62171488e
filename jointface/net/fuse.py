"""Folding batch normalisation into the convolution before it, for inference.

In eval mode a BatchNorm2d is a fixed per-channel affine map, so
``bn(conv(x)) == conv'(x)`` with ``W' = W * g`` and ``b' = (b - mean) * g + beta``
where ``g = gamma / sqrt(var + eps)``. Folding removes one full pass over every
feature map (a ResNet18 has 20 of them), which on a CPU is worth about a tenth
of the network's time.

:func:`fuse_batchnorm` returns a folded *copy*; the original module (the
reference path, and the one training and checkpoints use) is untouched. The
folded copy has the same outputs up to float rounding (checked in the tests)
but no BatchNorm layers, so it is for inference only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode."""
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.weight.copy_(conv.weight * gain.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        folded.bias.copy_((bias - bn.running_mean) * gain + bn.bias)
    return folded.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _fuse_in_place(module: nn.Module) -> int:
    folded = 0
    # attribute pairs of torchvision's ResNet blocks and stem: conv1/bn1, conv2/bn2, conv3/bn3
    for index in range(1, 4):
        conv, bn = getattr(module, f"conv{index}", None), getattr(module, f"bn{index}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(module, f"conv{index}", fold_conv_bn(conv, bn))
            setattr(module, f"bn{index}", nn.Identity())
            folded += 1
    # consecutive (Conv2d, BatchNorm2d) inside a Sequential: ResNet's downsample, JointNet's neck
    if isinstance(module, nn.Sequential):
        children = list(module._modules.items())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[conv_name] = fold_conv_bn(conv, bn)
                module._modules[bn_name] = nn.Identity()
                folded += 1
    for child in module.children():
        folded += _fuse_in_place(child)
    return folded


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv -> BatchNorm pair folded into one convolution."""
    fused = copy.deepcopy(model).eval()
    _fuse_in_place(fused)
    remaining = [name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if remaining:
        raise ValueError(f"BatchNorm layers not preceded by a convolution, left unfused: {remaining}")
    return fused
