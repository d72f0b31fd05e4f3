"""The documented CIFAR-10 network: three conv-pool stages, flatten, two Linear layers.

Pure torch: every interchangeable layer arrives as a factory (timm's `act_layer=` habit), so each stage gets its
own instance and PReLU slopes or BatchNorm statistics are never shared. This module never imports hydra.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Given the channel count of the feature map it will see, build a fresh layer.
LayerFactory = Callable[[int], nn.Module]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """One side of a pooled map, by the formula the seed gives (torch's documented output size):

    out = floor_or_ceil((size + 2p - d(k-1) - 1) / s + 1)

    With ceil_mode, torch also drops a last window that would start inside the right padding.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (math.ceil if ceil_mode else math.floor)(span / stride + 1)
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pool_geometry(pool: nn.Module) -> dict[str, tuple[int, int] | bool]:
    """kernel/stride/padding/dilation/ceil_mode of MaxPool2d, AvgPool2d, LPPool2d or BlurMaxPool2d, as (H, W) pairs.

    Read from the layer itself, so the numbers are the ones torch will use (stride=None means stride=kernel).
    """
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return {
        "kernel_size": kernel,
        "stride": stride,
        "padding": _pair(getattr(pool, "padding", 0)),  # LPPool2d has none
        "dilation": _pair(getattr(pool, "dilation", 1)),  # only MaxPool2d has one
        "ceil_mode": bool(pool.ceil_mode),
    }


def pooled_size(pool: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    g = pool_geometry(pool)
    return tuple(  # type: ignore[return-value]
        pool_output_size(hw[i], g["kernel_size"][i], g["stride"][i], g["padding"][i], g["dilation"][i], g["ceil_mode"])
        for i in range(2)
    )


def under_cpu_autocast(x: torch.Tensor) -> bool:
    """x is on the CPU inside its autocast, where three layers below compute differently from torch's (each is torch's
    elsewhere): a bf16 kernel there is slower than float32, or branches on the data (docs/performance.md)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def binomial_filter(size: int) -> torch.Tensor:
    """The size x size blur of anti-aliased pooling: the outer product of binomial row `size` (1; 1 1; 1 2 1;
    1 3 3 1; ...), summing to 1, so a flat map stays flat."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float32)
    kernel = torch.outer(row, row)
    return kernel / kernel.sum()  # (size, size)


class BlurMaxPool2d(nn.Module):
    """Anti-aliased max pooling (Zhang 2019, "Making convolutional networks shift-invariant again"): the max over
    each kernel_size window at stride 1, then a fixed binomial blur of blur_size per channel, sampled at `stride`.

    Max pooling at stride 2 keeps every other window's maximum, so a 1 px shift of the input changes which
    maxima survive (aliasing); the blur low-passes the dense max map before it is subsampled. The output size is
    exactly MaxPool2d(kernel_size, stride, padding)'s, and with blur_size=1 the output is MaxPool2d's itself.
    No parameters: the blur is a fixed buffer, outside the state dict, applied to however many channels come in.
    """

    dilation = 1  # the geometry pool_geometry reads: the same windows as MaxPool2d(kernel_size, stride, padding)
    ceil_mode = False

    def __init__(self, kernel_size: int | Sequence[int] = 3, stride: int | Sequence[int] | None = 2,
                 padding: int | Sequence[int] = 1, blur_size: int = 3):
        super().__init__()
        self.kernel_size, self.padding, self.blur_size = kernel_size, padding, blur_size
        self.stride = stride if stride is not None else kernel_size
        self.register_buffer("blur", binomial_filter(blur_size)[None, None], persistent=False)  # (1, 1, b, b)

    def dense_max(self, x: torch.Tensor) -> torch.Tensor:
        """The max over every window at stride 1, padded with -inf: (B, C, H + 2p - k + 1, W + 2p - k + 1)."""
        if (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing():  # a traced graph: one op
            return F.max_pool2d(x, self.kernel_size, 1, self.padding)
        # Without gradients, as a running maximum along W, then along H: the same numbers, without the argmax
        # indices max_pool2d keeps for a backward pass; validation and testing faster (docs/performance.md).
        (kh, kw), (ph, pw) = _pair(self.kernel_size), _pair(self.padding)
        if ph > kh // 2 or pw > kw // 2:  # max_pool2d's own rule, so that both ways refuse the same geometries
            raise ValueError(f"pad should be at most half of effective kernel size, but got pad={self.padding}, "
                             f"kernel_size={self.kernel_size} and dilation=1")
        y = F.pad(x, (pw, pw, ph, ph), value=-math.inf) if ph or pw else x
        for dim, k in ((3, kw), (2, kh)):
            n = y.shape[dim] - k + 1
            m = y.narrow(dim, 0, n)
            for i in range(1, k):
                m = torch.maximum(m, y.narrow(dim, i, n))
            y = m
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur_size == 1:  # no blur: sampling the dense max every `stride` px is MaxPool2d, one op instead of two
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        if under_cpu_autocast(x):
            # in float32 under the CPU's autocast, where bf16's depthwise conv is 6x slower and max_pool2d's backward
            # 2x (docs/performance.md); the max is exact either way, and the next layer's conv casts back
            with torch.autocast("cpu", enabled=False):
                return self.blurred(self.dense_max(x.float()))
        return self.blurred(self.dense_max(x))

    def blurred(self, y: torch.Tensor) -> torch.Tensor:
        """The binomial blur of the dense max y, one per channel, sampled at `stride`: (B, C, H', W')."""
        b = self.blur_size
        # pad (b-1)//2 before and b//2 after, so output pixel i is centred on dense pixel i * stride
        pads = ((b - 1) // 2, b // 2, (b - 1) // 2, b // 2)  # (left, right, top, bottom)
        mode = "reflect" if min(y.shape[-2:]) > max(pads) else "replicate"  # reflect needs more px than pad
        weight = self.blur.to(y.dtype).expand(y.shape[1], 1, b, b)
        return F.conv2d(F.pad(y, pads, mode=mode), weight, stride=self.stride, groups=y.shape[1])

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"blur_size={self.blur_size}")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, computed in float32 under the CPU's bf16 autocast, where torch runs it in bf16 at 0.77x of its
    float32 speed (1.23-1.40x this way: docs/performance.md). Otherwise, and in its parameters and state dict, it is
    nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if under_cpu_autocast(x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class PReLU(nn.PReLU):
    """nn.PReLU whose backward, under the CPU's bf16 autocast, takes the same time whatever the signs of its input.
    torch's PReLU backward branches on each element's sign, and at the half-negative input that follows a BatchNorm
    it ran 4.6x slower than at an all-positive one (docs/performance.md). The same forward; the input gradient is the
    same numbers, the slope's is summed in another order. Outside that autocast, and in its state dict, it is
    nn.PReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if under_cpu_autocast(x):
            dtype = torch.get_autocast_dtype("cpu")  # autocast runs prelu in it, input and slope alike
            with torch.autocast("cpu", enabled=False):
                return _SignFreePReLU.apply(x.to(dtype), self.weight.to(dtype))
        return super().forward(x)


class _SignFreePReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        channel = 1 if x.dim() > 1 else 0
        per_channel = weight.numel() > 1
        slope = weight.view([-1 if d == channel else 1 for d in range(x.dim())]) if per_channel else weight
        positive = torch.ops.aten.threshold_backward(grad, x, 0)  # grad where x > 0, else 0: no branch
        negative = grad - positive  # grad where x <= 0, else 0 (exactly)
        grad_x = positive + negative * slope
        grad_w = (negative * x).sum([d for d in range(x.dim()) if d != channel or not per_channel])
        return grad_x, grad_w.view_as(weight)


class ShrinksToNothing(ValueError):
    """A conv or pooling geometry that leaves no pixel; `layer` is "conv" or "pool", `trail` each stage's sizes."""

    def __init__(self, layer: str, what: str, trail: list[str]):
        self.layer, self.trail = layer, trail
        super().__init__(f"{what} ({'; '.join(trail) or 'first stage'})")


class Stage(nn.Sequential):
    """conv -> [norm] -> [act] -> pool -> [dropout]; the optional layers are left out when not chosen.

    Inspection needs the map pooling sees and the map it makes, so `pool_io` returns both from one pass.
    """

    def __init__(self, conv: nn.Conv2d, pool: nn.Module, norm=None, act=None, drop=None):
        layers = {"conv": conv, "norm": norm, "act": act, "pool": pool, "drop": drop}
        super().__init__(OrderedDict((k, v) for k, v in layers.items() if v is not None))

    def pool_io(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(before pooling, after pooling, stage output) for input x (B, C_in, H, W)."""
        before = x
        for name, layer in self.named_children():
            if name == "pool":
                break
            before = layer(before)  # (B, C, H, W)
        after = self.pool(before)  # (B, C, H', W')
        out = self.drop(after) if "drop" in self._modules else after
        return before, after, out


class CifarNet(nn.Sequential):
    """stage1..stage3 -> flatten -> fc1 -> [head_act] -> [head_drop] -> fc2.

    With max pooling and no norm, activation or dropout this is exactly the seed's nn.Sequential
    (145,578 parameters). The flatten size follows from the pooling geometry.
    """

    def __init__(
        self,
        pool_layer: LayerFactory,
        act_layer: LayerFactory | None = None,
        norm_layer: LayerFactory | None = None,
        drop_layer: LayerFactory | None = None,
        head_act_layer: LayerFactory | None = None,
        head_drop_layer: LayerFactory | None = None,
        channels: Sequence[int] = (32, 32, 64),
        conv_kernel: int = 5,
        conv_padding: int = 2,
        hidden: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        hw = (image_size, image_size)
        c_in = in_channels
        trail: list[str] = []  # what each stage makes of the map, for the error message
        feature_sizes: list[tuple[int, int]] = []  # (H, W) after each stage's pooling
        for i, c_out in enumerate(channels, start=1):
            conv = nn.Conv2d(c_in, c_out, conv_kernel, padding=conv_padding)
            conv_hw = (hw[0] + 2 * conv_padding - conv_kernel + 1, hw[1] + 2 * conv_padding - conv_kernel + 1)
            if min(conv_hw) < 1:
                raise ShrinksToNothing("conv", f"stage{i}'s conv shrinks {hw[0]}x{hw[1]} to nothing", trail)
            pool = pool_layer(c_out)
            hw = pooled_size(pool, conv_hw)
            trail.append(f"stage{i} {conv_hw[0]}x{conv_hw[1]} -> {max(hw[0], 0)}x{max(hw[1], 0)}")
            if min(hw) < 1:
                raise ShrinksToNothing("pool", "pooling shrinks a feature map to nothing", trail)
            feature_sizes.append(hw)
            layers[f"stage{i}"] = Stage(
                conv,
                pool,
                norm=norm_layer(c_out) if norm_layer else None,
                act=act_layer(c_out) if act_layer else None,
                drop=drop_layer(c_out) if drop_layer else None,
            )
            c_in = c_out
        flat = c_in * hw[0] * hw[1]  # 64 * 4 * 4 = 1024 for the documented geometry
        layers["flatten"] = nn.Flatten()  # (B, C, H, W) -> (B, C*H*W)
        layers["fc1"] = nn.Linear(flat, hidden)
        if head_act_layer:
            layers["head_act"] = head_act_layer(hidden)
        if head_drop_layer:
            layers["head_drop"] = head_drop_layer(hidden)
        layers["fc2"] = nn.Linear(hidden, num_classes)
        super().__init__(layers)
        self.feature_sizes = feature_sizes
        self.flat_features = flat

    @property
    def stages(self) -> list[Stage]:
        return [m for m in self.children() if isinstance(m, Stage)]

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the head sees: `flatten` (B, 1024 for the documented geometry), the features fc1 receives, and
        `hidden` (B, 64), what fc2 receives (after head_act and head_drop), with `logits` (B, 10)."""
        for name, layer in self.named_children():
            if name == "fc1":
                flat = x
            if name == "fc2":
                hidden = x
            x = layer(x)
        return {"flatten": flat, "hidden": hidden, "logits": x}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
