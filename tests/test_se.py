"""SE block: parameter counts and key names of every official instance, the docs/method.md §3.1 maths, gradients, AMP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.registry import create
from models.se import SemanticEmbedding, SemanticEmbeddingBottleneck, _phase_classes

torch.set_num_threads(1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# (spec, kwargs, params) for every SE instance of docs/method.md §3.2.
INSTANCES = [
    ("se/restormer-xattn-dual-gated@1", {"sem_channels": 192, "channels": 64}, 113_590),  # SNR att_block_3
    ("se/restormer-xattn-dual-gated@1", {"sem_channels": 96, "channels": 64}, 107_446),  # SNR att_block_2
    ("se/restormer-xattn-dual-gated@1", {"sem_channels": 48, "channels": 64}, 104_374),  # SNR att_block_1
    ("se/restormer-xattn-gdfn@1", {"sem_channels": 96, "channels": 32, "gelu": "tanh"}, 26_812),  # DRBN 1
    ("se/restormer-xattn-gdfn@1", {"sem_channels": 48, "channels": 16, "gelu": "tanh"}, 7_238),  # DRBN 2
    ("se/restormer-xattn-gdfn@1", {"sem_channels": 59, "channels": 16, "gelu": "tanh"}, 7_414),  # DRBN 3
    ("se/restormer-xattn-gdfn@1", {"sem_channels": 48, "channels": 64}, 93_494),  # LLFlow-S 1
    ("se/restormer-xattn-gdfn@1", {"sem_channels": 96, "channels": 64}, 96_566),  # LLFlow-S 2
    ("se/restormer-xattn-gdfn@1", {"sem_channels": 192, "channels": 64}, 102_710),  # LLFlow-S 3
    ("se/restormer-xattn-bottleneck@1", {"sem_channels": 48}, 730_306),  # LLFlow-L 1
]

COMMON_KEYS = {
    "conv1.weight",
    "conv1.bias",
    "norm1.body.weight",
    "norm1.body.bias",
    "attn.temperature",
    "attn.kv.weight",
    "attn.kv_dwconv.weight",
    "attn.q.weight",
    "attn.q_dwconv.weight",
    "attn.project_out.weight",
    "norm2.body.weight",
    "norm2.body.bias",
}


@pytest.mark.parametrize(("spec", "kwargs", "expected"), INSTANCES)
def test_parameter_counts_match_official(spec, kwargs, expected):
    assert n_params(create(spec, **kwargs)) == expected


def test_gdfn_state_dict_names_and_shapes():
    sd = SemanticEmbedding(96, 32, ffn="gdfn", gelu="tanh").state_dict()
    assert set(sd) == COMMON_KEYS | {"ffn.project_in.weight", "ffn.dwconv.weight", "ffn.project_out.weight"}
    hidden = int(32 * 2.66)  # 85
    assert sd["conv1.weight"].shape == (32, 96, 1, 1)
    assert sd["attn.temperature"].shape == (2, 1, 1)
    assert sd["attn.kv_dwconv.weight"].shape == (64, 1, 3, 3)
    assert sd["attn.q_dwconv.weight"].shape == (32, 32, 3, 3)  # a full conv despite the name
    assert sd["ffn.project_in.weight"].shape == (2 * hidden, 32, 1, 1)
    assert sd["ffn.dwconv.weight"].shape == (2 * hidden, 1, 3, 3)
    assert sd["ffn.project_out.weight"].shape == (32, hidden, 1, 1)


def test_dual_gated_state_dict_keeps_unused_official_tensors_frozen():
    se = SemanticEmbedding(192, 64, ffn="dual-gated")
    sd = se.state_dict()
    ffn_keys = {"project_in", "project_in_R", "project_in_S", "dwconv", "project_out"}
    assert set(sd) == COMMON_KEYS | {f"ffn.{k}.weight" for k in ffn_keys}
    assert sd["ffn.project_in.weight"].shape == (170, 64, 1, 1)
    assert sd["ffn.dwconv.weight"].shape == (340, 1, 3, 3)
    assert sd["ffn.project_in_R.weight"].shape == sd["ffn.project_in_S.weight"].shape == (170, 64, 1, 1)
    frozen = {name for name, p in se.named_parameters() if not p.requires_grad}
    assert frozen == {"ffn.project_in.weight", "ffn.dwconv.weight"}


def test_bottleneck_state_dict_names_and_shapes():
    sd = SemanticEmbeddingBottleneck(48, 320, inner=192).state_dict()
    extra = {"conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias"}
    ffn = {"ffn.project_in.weight", "ffn.dwconv.weight", "ffn.project_out.weight"}
    assert set(sd) == COMMON_KEYS | extra | ffn
    assert sd["conv1.weight"].shape == (192, 48, 1, 1)  # semantics -> inner
    assert sd["conv2.weight"].shape == (192, 320, 1, 1)  # image -> inner
    assert sd["conv3.weight"].shape == (320, 192, 1, 1)  # inner -> image
    assert sd["ffn.project_in.weight"].shape == (384, 192, 1, 1)  # GDFN factor 1


def test_official_state_dict_loads_strictly():
    src = SemanticEmbedding(59, 16, gelu="tanh")
    dst = create("se/restormer-xattn-gdfn@1", sem_channels=59, channels=16, gelu="tanh")
    dst.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, strict=True)
    x, s = torch.randn(1, 16, 8, 8), torch.randn(1, 59, 8, 8)
    torch.testing.assert_close(dst(x, s), src(x, s))


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial LayerNorm affine and temperatures so the reference check covers them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() <= 3:  # norms, biases, temperature
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _layer_norm(x, norm):
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    w, b = norm.body.weight.view(1, -1, 1, 1), norm.body.bias.view(1, -1, 1, 1)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _reference(se: SemanticEmbedding, x, s, approximate: str):
    """Straight transcription of docs/method.md §3.1 (steps 1-5) with the module's weights."""
    a, heads = se.attn, se.attn.heads
    b, c, h, w = x.shape
    s = F.interpolate(s, size=x.shape[-2:], mode="nearest")
    s = F.conv2d(s, se.conv1.weight, se.conv1.bias)
    r_hat, s_hat = _layer_norm(x, se.norm1), _layer_norm(s, se.norm1)
    q = F.conv2d(F.conv2d(s_hat, a.q.weight), a.q_dwconv.weight, padding=1)
    kv = F.conv2d(F.conv2d(r_hat, a.kv.weight), a.kv_dwconv.weight, padding=1, groups=2 * c)
    k, v = kv.chunk(2, 1)
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    attn = torch.softmax(a.temperature * (q @ k.transpose(-1, -2)), dim=-1)
    r1 = r_hat + F.conv2d((attn @ v).reshape(b, c, h, w), a.project_out.weight)
    f = se.ffn
    if se.ffn_kind == "gdfn":
        u = F.conv2d(
            F.conv2d(_layer_norm(r1, se.norm2), f.project_in.weight),
            f.dwconv.weight,
            padding=1,
            groups=f.dwconv.weight.shape[0],
        )
        u1, u2 = u.chunk(2, 1)
        return r1 + F.conv2d(F.gelu(u1, approximate=approximate) * u2, f.project_out.weight)
    gx = F.gelu(F.conv2d(_layer_norm(r1, se.norm2), f.project_in_R.weight), approximate=approximate)
    gy = F.gelu(F.conv2d(_layer_norm(s_hat, se.norm2), f.project_in_S.weight), approximate=approximate)
    return r1 + F.conv2d(gx * gy, f.project_out.weight)


@pytest.mark.parametrize(
    ("ffn", "gelu", "approximate"),
    [("gdfn", "tanh", "tanh"), ("gdfn", "exact", "none"), ("dual-gated", "exact", "none")],
)
def test_forward_matches_spec_reference(ffn, gelu, approximate):
    torch.manual_seed(0)
    se = SemanticEmbedding(12, 8, ffn=ffn, gelu=gelu).double()
    _randomise(se)
    x, s = torch.randn(2, 8, 6, 10, dtype=torch.float64), torch.randn(2, 12, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(se(x, s), _reference(se, x, s, approximate), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("factor", "offsets"),
    [
        (1, [(-1, 0, 1)]),
        (2, [(-1, 0, 0), (0, 0, 1)]),
        (3, [(-1, 0, 0), (0, 0, 0), (0, 0, 1)]),
        (4, [(-1, 0, 0), (0, 0, 0), (0, 0, 1)]),
    ],
)
def test_phase_classes_of_a_nearest_upsampled_axis(factor, offsets):
    phases, got = _phase_classes(factor)
    assert list(got) == offsets
    assert sorted(a for group in phases for a in group) == list(range(factor))
    assert phases[0] == (0,) and phases[-1] == (factor - 1,)


def _grads(module, *inputs):
    return [t.grad.clone() for t in inputs] + [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
    ]


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize(("ffn", "gelu"), [("dual-gated", "exact"), ("gdfn", "tanh")])
def test_low_resolution_prior_path_equals_the_upsampled_computation(factor, ffn, gelu):
    """The fast path (semantic branch at the prior's resolution, collapsed phase kernels, pooled keys)
    gives the same output and the same gradients for every input and parameter as running the block
    on the explicitly nearest-upsampled prior, including the image borders."""
    torch.manual_seed(factor)
    se = SemanticEmbedding(12, 8, ffn=ffn, gelu=gelu).double()
    _randomise(se)
    x = torch.randn(2, 8, 5 * factor, 3 * factor, dtype=torch.float64, requires_grad=True)
    low = torch.randn(2, 12, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 8, 5 * factor, 3 * factor, dtype=torch.float64)

    (se(x, low) * weight).sum().backward()
    fast_out, fast = se(x, low).detach(), _grads(se, x, low)
    for t in (x, low, *se.parameters()):
        t.grad = None
    up = F.interpolate(low, scale_factor=factor, mode="nearest")
    (se(x, up) * weight).sum().backward()  # sizes match: the plain full-resolution computation
    torch.testing.assert_close(fast_out, se(x, up).detach(), rtol=1e-10, atol=1e-10)
    for got, want in zip(fast, _grads(se, x, low), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_gelu_variant_changes_the_output():
    torch.manual_seed(0)
    exact = SemanticEmbedding(12, 8, gelu="exact")
    tanh = SemanticEmbedding(12, 8, gelu="tanh")
    tanh.load_state_dict(exact.state_dict())
    _randomise(exact), _randomise(tanh)
    x, s = torch.randn(1, 8, 8, 8), torch.randn(1, 12, 8, 8)
    assert not torch.allclose(exact(x, s), tanh(x, s))


def test_bottleneck_matches_inner_block_between_projections():
    torch.manual_seed(0)
    blk = SemanticEmbeddingBottleneck(6, channels=20, inner=8).double()
    _randomise(blk)
    x, s = torch.randn(2, 20, 4, 4, dtype=torch.float64), torch.randn(2, 6, 8, 8, dtype=torch.float64)
    inner = F.conv2d(x, blk.conv2.weight, blk.conv2.bias)
    expected = F.conv2d(_reference(blk, inner, s, "none"), blk.conv3.weight, blk.conv3.bias)
    torch.testing.assert_close(blk(x, s), expected, rtol=1e-9, atol=1e-9)
    assert blk(x, s).shape == x.shape


@pytest.mark.parametrize("sem_size", [(2, 3), (8, 12), (16, 24)])
def test_output_shape_and_semantic_resizing(sem_size):
    se = SemanticEmbedding(10, 8)
    x = torch.randn(2, 8, 8, 12)
    assert se(x, torch.randn(2, 10, *sem_size)).shape == x.shape


@pytest.mark.parametrize(
    ("module", "channels"),
    [
        (SemanticEmbedding(10, 8, ffn="dual-gated"), 8),
        (SemanticEmbedding(10, 8, ffn="gdfn", gelu="tanh"), 8),
        (SemanticEmbeddingBottleneck(10, channels=12, inner=8), 12),
    ],
    ids=["dual-gated", "gdfn", "bottleneck"],
)
def test_gradients_reach_both_inputs_and_every_trainable_parameter(module, channels):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 6, 6, requires_grad=True)
    s = torch.randn(2, 10, 3, 3, requires_grad=True)
    (module(x, s) * torch.randn(2, channels, 6, 6)).sum().backward()
    for t in (x, s):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_autocast_bf16_runs_and_stays_close():
    torch.manual_seed(0)
    se = SemanticEmbedding(10, 8, ffn="dual-gated")
    x, s = torch.randn(2, 8, 8, 8), torch.randn(2, 10, 4, 4)
    ref = se(x, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = se(x.bfloat16(), s.bfloat16())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_wrong_channels_give_a_clear_error():
    se = SemanticEmbedding(10, 8)
    with pytest.raises(ValueError, match="built for x with 8 and sem with 10"):
        se(torch.randn(1, 8, 4, 4), torch.randn(1, 11, 4, 4))
    with pytest.raises(ValueError, match="ffn must be"):
        SemanticEmbedding(10, 8, ffn="mlp")  # type: ignore[arg-type]


def test_split_pointwise_depthwise_equals_the_joint_convs_and_gives_dense_halves():
    from models.se import _pointwise_then_depthwise

    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(16, 2 * 24, 1, bias=False)
    depthwise = torch.nn.Conv2d(2 * 24, 2 * 24, 3, padding=1, groups=2 * 24, bias=False)
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    a1, a2 = _pointwise_then_depthwise(x, pointwise, depthwise)
    b1, b2 = depthwise(pointwise(x)).chunk(2, dim=1)
    torch.testing.assert_close(a1, b1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2, b2, rtol=1e-5, atol=1e-6)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (a1, a2))
    assert not b1.is_contiguous(memory_format=torch.channels_last)  # what the split avoids
    (a1.square().sum() + a2.sum()).backward()
    split_grads = [pointwise.weight.grad.clone(), depthwise.weight.grad.clone()]
    pointwise.zero_grad()
    depthwise.zero_grad()
    (b1.square().sum() + b2.sum()).backward()
    torch.testing.assert_close(split_grads[0], pointwise.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split_grads[1], depthwise.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sem_size", [(6, 10), (3, 5)], ids=["same-size", "half-size"])
@pytest.mark.parametrize(
    ("ffn", "gelu", "approximate"), [("gdfn", "tanh", "tanh"), ("dual-gated", "exact", "none")]
)
def test_gradients_match_spec_reference(sem_size, ffn, gelu, approximate):
    """The hand-written attention backward (and the low-resolution prior path) give autograd's gradients
    of the plain §3.1 transcription, for both inputs and every parameter."""
    torch.manual_seed(3)
    se = SemanticEmbedding(12, 8, ffn=ffn, gelu=gelu).double()
    _randomise(se)
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 12, *sem_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    (se(x, s) * weight).sum().backward()
    fast = _grads(se, x, s)
    for t in (x, s, *se.parameters()):
        t.grad = None
    (_reference(se, x, s, approximate) * weight).sum().backward()
    for got, want in zip(fast, _grads(se, x, s), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _cosine_by_autograd(q, count, k, factor):
    """The channel cosine left to autograd: clamped norms (as ``F.normalize``) and a matmul. Not
    ``models.se._cosine_parts``: its ``sqrt`` of a zero sum of squares has an infinite derivative, so
    autograd through it gives NaN on a dead channel (only the hand-written backward differentiates it)."""
    from models.se import _pool_phases

    q_sq = (q * q * (1.0 if count is None else count[:, None])).sum(1)
    gram = q.transpose(1, 2) @ _pool_phases(k, factor)
    q_norm = q_sq.sqrt().clamp_min(1e-12)
    k_norm = k.flatten(2).norm(dim=-1).clamp_min(1e-12)
    return gram / (q_norm[:, :, None] * k_norm[:, None, :])


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_channel_cosine_backward_passes_gradcheck(factor):
    from models.se import _ChannelCosine, _entry_counts, _phase_matrices

    torch.manual_seed(factor)
    h, w = 2, 3
    sizes = _phase_matrices(factor, torch.empty(0, dtype=torch.float64))[2]
    n = sizes.numel()
    count = None if factor == 1 else _entry_counts(sizes, h, w)
    rows = h * w * (1 if factor == 1 else n * n)
    q = torch.randn(2, rows, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, h * factor, w * factor, dtype=torch.float64)
    k = k.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: _ChannelCosine.apply(q, count, k, factor), (q, k))


def test_channel_cosine_of_an_all_zero_channel_matches_autograd_clamping():
    """A dead key channel (all zeros) gives cosine 0 and the same gradients as clamped norms under autograd."""
    from models.se import _ChannelCosine

    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    k[:, 1] = 0.0
    k.requires_grad_()
    grad = torch.randn(2, 4, 4, dtype=torch.float64)
    got = _ChannelCosine.apply(q, None, k, 1)
    assert (got[:, :, 1] == 0).all()
    got_grads = torch.autograd.grad(got, (q, k), grad)
    want = _cosine_by_autograd(q, None, k, 1)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, torch.autograd.grad(want, (q, k), grad), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_traced_block_saves_loads_and_matches_eager():
    """Inference and tracing see standard operators only (the hand-written backward is for training), so a
    traced SE block serialises and gives the eager output."""
    import io

    torch.manual_seed(0)
    se = SemanticEmbedding(10, 8, ffn="dual-gated").eval()
    x, s = torch.randn(1, 8, 8, 12), torch.randn(1, 10, 2, 3)
    with torch.no_grad():
        traced = torch.jit.trace(se, (x, s))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x, s), se(x, s))
