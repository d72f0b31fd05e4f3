"""The documented network, every layer option of every group, and the pooling geometry."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import build
from cifarlab.model import BlurMaxPool2d, CifarNet, count_parameters, pool_output_size, pooled_size
from conftest import compose_config, option_names


def seed_model() -> nn.Sequential:
    """The seed tutorial's model (seed 002), verbatim."""
    return nn.Sequential(
        nn.Conv2d(in_channels=3, out_channels=32, kernel_size=5, stride=1, padding=2),
        nn.MaxPool2d(kernel_size=2, padding=0),
        nn.Conv2d(in_channels=32, out_channels=32, kernel_size=5, stride=1, padding=2),
        nn.MaxPool2d(kernel_size=2, padding=0),
        nn.Conv2d(in_channels=32, out_channels=64, kernel_size=5, stride=1, padding=2),
        nn.MaxPool2d(kernel_size=2, padding=0),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Linear(in_features=1024, out_features=64),
        nn.Linear(in_features=64, out_features=10),
    )


def leaf_layers(model: nn.Module) -> list[str]:
    return [repr(m) for m in model.modules() if not list(m.children())]


def test_default_model_is_the_documented_network():
    model = build.network(compose_config().model)
    reference = seed_model()
    assert count_parameters(model) == count_parameters(reference) == 145_578  # the figure the seed documents
    assert leaf_layers(model) == leaf_layers(reference)
    # Same parameters in the same order -> the same function as the seed's nn.Sequential.
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            mine.copy_(theirs)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


MODEL_OPTIONS = [(g, o) for g in build.LAYER_GROUPS for o in option_names(f"model/{g}")]


@pytest.mark.parametrize("group,option", MODEL_OPTIONS, ids=[f"{g}={o}" for g, o in MODEL_OPTIONS])
def test_every_option_builds_and_trains_a_step(group, option):
    torch.manual_seed(0)
    cfg = compose_config(f"model/{group}={option}")
    model = build.network(cfg.model)
    optimizer = build.optimizer(cfg.optimizer)(model.parameters())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    logits = model(x)
    assert logits.shape == (8, 10)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(logits, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    assert model(x).shape == (8, 10)


@pytest.mark.parametrize("option", ["prelu", "batchnorm", "groupnorm"])
def test_each_stage_gets_its_own_layer_instance(option):
    group = "norm" if option.endswith("norm") else "activation"
    model = build.network(compose_config(f"model/{group}={option}").model)
    layers = [getattr(stage, "norm" if group == "norm" else "act") for stage in model.stages]
    assert len({id(m) for m in layers}) == 3
    assert len({id(p) for m in layers for p in m.parameters()}) == sum(len(list(m.parameters())) for m in layers)


def test_prelu_per_channel_gets_each_stage_channel_count():
    model = build.network(compose_config("model/activation=prelu", "model.activation.num_parameters=channels").model)
    assert [s.act.num_parameters for s in model.stages] == [32, 32, 64]
    assert model.head_act.num_parameters == 64
    assert model.stage1.act.weight.shape == (32,)


def test_batchnorm_sees_each_stage_channel_count():
    model = build.network(compose_config("model/norm=batchnorm").model)
    assert [s.norm.num_features for s in model.stages] == [32, 32, 64]


def test_head_activation_and_dropout_follow_the_config():
    on = build.network(compose_config("model/activation=relu", "model/dropout=dropout2d").model)
    names = [n for n, _ in on.named_children()]
    assert names == ["stage1", "stage2", "stage3", "flatten", "fc1", "head_act", "head_drop", "fc2"]
    assert type(on.head_drop) is nn.Dropout  # a vector gets element dropout, even when the stages use Dropout2d
    assert type(on.stage1.drop) is nn.Dropout2d
    off = build.network(
        compose_config("model/activation=relu", "model/dropout=dropout2d", "model.head_activation=false",
                       "model.head_dropout=false").model
    )
    assert [n for n, _ in off.named_children()] == ["stage1", "stage2", "stage3", "flatten", "fc1", "fc2"]
    assert [n for n, _ in off.stage1.named_children()] == ["conv", "act", "pool", "drop"]


def test_stage_order_is_conv_norm_act_pool_dropout():
    model = build.network(
        compose_config("model/activation=relu", "model/norm=batchnorm", "model/dropout=dropout").model
    )
    assert [n for n, _ in model.stage2.named_children()] == ["conv", "norm", "act", "pool", "drop"]


GEOMETRIES = [
    (size, k, s, p, d, ceil)
    for size, k, s, p, d, ceil in itertools.product([5, 7, 8, 16, 32], [1, 2, 3, 4], [1, 2, 3], [0, 1, 2], [1, 2], [False, True])
    if p <= k // 2 and size + 2 * p >= d * (k - 1) + 1
]


def test_output_size_formula_matches_torch_for_max_and_avg_pooling():
    for size, k, s, p, d, ceil in GEOMETRIES:
        x = torch.zeros(1, 1, size, size)
        got_max = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil).shape[-1]
        assert pool_output_size(size, k, s, p, d, ceil) == got_max, (size, k, s, p, d, ceil)
        if d == 1:
            assert pool_output_size(size, k, s, p, 1, ceil) == F.avg_pool2d(x, k, s, p, ceil_mode=ceil).shape[-1]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model/pool=avg", "model.pool.kernel_size=3", "model.pool.stride=3"],
        ["model/pool=max", "model.pool.kernel_size=3", "model.pool.stride=2", "model.pool.padding=1"],
        ["model/pool=max", "model.pool.kernel_size=2", "model.pool.ceil_mode=true", "model.pool.dilation=2"],
        ["model/pool=lp", "model.pool.kernel_size=[2,3]", "model.pool.stride=[2,1]"],
        ["model/pool=avg", "model.pool.kernel_size=3", "model.pool.stride=2", "model.pool.ceil_mode=true"],
    ],
)
def test_flatten_size_follows_the_pooling_geometry(overrides):
    model = build.network(compose_config(*overrides).model)
    x = torch.randn(2, 3, 32, 32)
    for stage, expected in zip(model.stages, model.feature_sizes):
        x = stage(x)
        assert tuple(x.shape[-2:]) == expected
    assert x.flatten(1).shape[1] == model.flat_features == model.fc1.in_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pool_io_returns_what_the_stage_computes():
    model = build.network(compose_config("model/activation=relu", "model/norm=batchnorm").model).eval()
    x = torch.randn(2, 3, 32, 32)
    before, after, out = model.stage1.pool_io(x)
    torch.testing.assert_close(after, model.stage1.pool(before))
    torch.testing.assert_close(out, model.stage1(x))
    assert before.shape == (2, 32, 32, 32) and after.shape == (2, 32, 16, 16)


def test_model_refuses_a_geometry_that_leaves_nothing():
    with pytest.raises(ValueError, match=r"shrinks a feature map to nothing \(.*; stage3 2x2 -> 0x0\)"):
        CifarNet(pool_layer=lambda c: nn.MaxPool2d(4))


# ---------------------------------------------------------------------------------------------------------------
# model/pool=blurmax: anti-aliased max pooling


BLURMAX_GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 3, 1), (2, 1, 0), ((3, 2), (2, 1), (1, 0)), (5, 2, 2), (3, None, 0)]


@pytest.mark.parametrize("blur_size", [1, 2, 3, 4, 5, 7])
def test_blurmax_output_size_is_max_pooling_s_and_blur_size_1_is_max_pooling(blur_size):
    torch.manual_seed(0)
    for (k, s, p), size in itertools.product(BLURMAX_GEOMETRIES, [32, 16, 8, 7, 5, 4, 3, 2]):
        pool = BlurMaxPool2d(k, s, p, blur_size)
        reference = nn.MaxPool2d(k, s, p)
        x = torch.randn(2, 5, size, size + 1)
        if pooled_size(reference, tuple(x.shape[-2:]))[0] < 1:
            continue  # no window fits
        y = pool(x)
        assert y.shape == reference(x).shape, (k, s, p, size)
        assert tuple(y.shape[-2:]) == pooled_size(pool, tuple(x.shape[-2:]))  # what the config check computes
        if blur_size == 1:
            assert torch.equal(y, reference(x))


def test_blurmax_is_a_binomial_blur_of_the_stride_1_max_map():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16, 16)
    pool = BlurMaxPool2d(kernel_size=3, stride=2, padding=1, blur_size=3)
    dense = F.pad(F.max_pool2d(x, 3, 1, 1), (1, 1, 1, 1), mode="reflect")  # (2, 32, 18, 18)
    # output pixel (i, j): [1 2 1] x [1 2 1] / 16 around dense pixel (2i, 2j), written out by hand
    weights = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    expected = sum(weights[a][b] * dense[..., a : a + 16 : 2, b : b + 16 : 2] for a in range(3) for b in range(3)) / 16
    torch.testing.assert_close(pool(x), expected)
    torch.testing.assert_close(pool(torch.full((1, 3, 8, 8), 0.7)), torch.full((1, 3, 4, 4), 0.7))  # flat stays flat
    assert torch.equal(pool(x.to(memory_format=torch.channels_last)), pool(x))
    assert not list(pool.parameters()) and not pool.state_dict()  # nothing learned, nothing in checkpoints


@pytest.mark.parametrize("kernel,padding", [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), ((3, 2), (1, 0)), (5, 2)])
def test_blurmax_without_gradients_takes_the_same_max_as_max_pool2d(kernel, padding):
    """Validation and testing take the stride-1 max as running maxima (no argmax indices kept): exactly
    max_pool2d's numbers, ties, NaN and the memory format included, for any window, padding, dtype and layout."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 11, 9)
    x[0, 0, 2:6, 2:6] = 0.5  # ties
    x[1, 2, 4, 4] = float("nan")
    pool = BlurMaxPool2d(kernel_size=kernel, stride=2, padding=padding)
    for dtype, fmt in itertools.product((torch.float32, torch.bfloat16), (torch.contiguous_format, torch.channels_last)):
        xs = x.to(dtype).contiguous(memory_format=fmt)
        with torch.no_grad():
            running = pool.dense_max(xs)
        indexed = F.max_pool2d(xs, kernel, 1, padding)
        torch.testing.assert_close(running, indexed, rtol=0, atol=0, equal_nan=True)
        assert running.is_contiguous(memory_format=fmt)
        with torch.no_grad():
            out = pool(xs)
        torch.testing.assert_close(out, pool(xs.requires_grad_()).detach(), rtol=0, atol=0, equal_nan=True)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    too_wide = BlurMaxPool2d(kernel_size=kernel, stride=2, padding=(kh // 2 + 1, kw // 2 + 1))
    for grad in (False, True):  # a padding max_pool2d refuses is refused both ways, in torch's words
        with torch.set_grad_enabled(grad), pytest.raises((RuntimeError, ValueError), match="pad should be at most half"):
            too_wide.dense_max(x.requires_grad_(grad))


def test_blurmax_computes_in_float32_under_the_cpus_bf16_autocast_and_gives_its_gradient():
    """bf16 autocast on a CPU: the max and the depthwise blur run in float32 (faster there than in bf16) on the bf16
    map that autocast's convs hand them, so the gradient is float32's, rounded once; outside autocast nothing changes."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16, 16).bfloat16().requires_grad_()
    grad = torch.randn(2, 32, 8, 8)
    pool = BlurMaxPool2d(kernel_size=3, stride=2, padding=1, blur_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x)
    assert out.dtype == torch.float32
    x32 = x.detach().float().requires_grad_()
    torch.testing.assert_close(out, pool(x32), rtol=0, atol=0)  # the max of bf16 values is exact
    out.backward(grad)
    pool(x32).backward(grad)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, x32.grad.bfloat16(), rtol=0, atol=0)  # not summed over windows in bf16
    assert pool(x.detach()).dtype == torch.bfloat16  # a bf16 tensor outside autocast: computed as given


def test_groupnorm_is_torchs_and_computes_in_float32_under_the_cpus_bf16_autocast():
    from cifarlab.model import GroupNorm

    torch.manual_seed(0)
    ours, torchs = GroupNorm(8, 32), nn.GroupNorm(8, 32)
    assert ours.state_dict().keys() == torchs.state_dict().keys()  # checkpoints of either load into the other
    x = torch.randn(4, 32, 8, 8)
    torch.testing.assert_close(ours(x), torchs(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torchs(x.bfloat16().float()), rtol=0, atol=0)


def backward_ops(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> set[str]:
    """The aten ops that the backward pass through layer runs, under the CPU's bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("num_parameters", [1, 32])
@pytest.mark.parametrize("shape", [(4, 32, 8, 8), (6, 32)])  # a stage's maps; the head's features
def test_prelu_is_torchs_with_a_backward_that_does_not_branch_on_signs_under_the_cpus_bf16_autocast(
        num_parameters, shape):
    """torch's PReLU backward branches on every element's sign, so its time depends on how many are negative (4.6x
    slower at half than at none: docs/performance.md). Under the CPU's bf16 autocast cifarlab's computes the same
    output and input gradient without that kernel; outside it, and in its state dict, it is nn.PReLU."""
    from cifarlab.model import PReLU

    torch.manual_seed(0)
    ours, torchs = PReLU(num_parameters), nn.PReLU(num_parameters)
    with torch.no_grad():
        ours.weight.uniform_(0, 0.5)
    torchs.load_state_dict(ours.state_dict())  # checkpoints of either load into the other
    x = torch.randn(*shape)
    x[0, :3] = 0  # zeros go the negative side's way in both
    grad = torch.linspace(-1, 1, x.numel()).view(shape)
    results = {}
    for name, layer in {"ours": ours, "torch's": torchs}.items():
        for cast in (False, True):
            xx = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
                out = layer(xx)
            out.backward(grad.to(out.dtype))
            results[name, cast] = out, xx.grad, layer.weight.grad.clone()
            layer.weight.grad = None
    for cast in (False, True):
        (out, gx, gw), (t_out, t_gx, t_gw) = results["ours", cast], results["torch's", cast]
        assert out.dtype == t_out.dtype == (torch.bfloat16 if cast else torch.float32)
        torch.testing.assert_close(out, t_out, rtol=0, atol=0)
        torch.testing.assert_close(gx, t_gx, rtol=0, atol=0)
        if cast:  # the slope's gradient: the same bf16 products, summed in another order
            torch.testing.assert_close(gw, t_gw, rtol=2e-2, atol=2e-2 * t_gw.abs().max().item())
        else:
            torch.testing.assert_close(gw, t_gw, rtol=0, atol=0)
    branchy = "aten::_prelu_kernel_backward"
    bf16_x = x.bfloat16().requires_grad_()
    assert branchy in backward_ops(torchs, bf16_x, grad.bfloat16())  # the control: the op this test looks for
    assert branchy not in backward_ops(ours, bf16_x, grad.bfloat16())


def test_blurmax_is_less_moved_by_a_one_pixel_shift_than_max_pooling():
    """The point of the blur (Zhang 2019): shifting the input by 1 px changes the stride-2 pooled map less."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, 34, 34)
    change = {}
    for name, pool in {"max": nn.MaxPool2d(3, 2, 1), "blurmax": BlurMaxPool2d(3, 2, 1, 3)}.items():
        a, b = pool(x[..., 1:33, 1:33]), pool(x[..., 1:33, 2:34])  # the same image, one column apart
        change[name] = ((a - b).norm() / a.norm()).item()
    assert change["blurmax"] < 0.75 * change["max"], change


def test_blurmax_in_the_model_keeps_the_parameters_and_the_flatten_size():
    max_model = build.network(compose_config("experiment=best", "model/pool=max").model)  # 3/2/1, from best
    blur_model = build.network(compose_config("experiment=best").model)
    assert type(max_model.stage1.pool) is nn.MaxPool2d
    assert count_parameters(blur_model) == count_parameters(max_model)
    assert blur_model.feature_sizes == max_model.feature_sizes == [(16, 16), (8, 8), (4, 4)]
    assert blur_model.state_dict().keys() == max_model.state_dict().keys()  # checkpoints move between the two
    assert isinstance(blur_model.stage1.pool, BlurMaxPool2d) and blur_model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
