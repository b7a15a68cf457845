"""Bad input at every public entry point, non-finite values that stay inside their own image, and determinism.

Documented behaviours checked here:
- a model raises ValueError/TypeError from ``check_input`` (never from deep inside) for a non-tensor, a rank other
  than 4, a non-floating dtype, a dtype or device other than its weights' (outside autocast), wrong channels, an
  empty batch, or a size it cannot take;
- NaN or inf pixels are not an error: they make that image's outputs non-finite and leave every other image's
  outputs exactly as when it runs alone (every operation is per image; the clustering sorts each (image, head) row
  on its own);
- the clustering of a non-finite query row is still a permutation of its tokens;
- the same input gives bit-identical outputs, also with ``torch.use_deterministic_algorithms(True)``;
- a model built on the meta device runs forward there (shape inference without memory).
"""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from boatvit import FeatureSpaceAttention, balanced_hierarchical_clustering, cli, feature_space_attention

from reduced_models import FAMILIES as REDUCED_NAMES
from reduced_models import NUM_CLASSES, reduced, reduced_kwargs

FAMILIES = list(REDUCED_NAMES)


@pytest.fixture(scope='module', params=FAMILIES)
def fixed_model(request):
    """Built for 64 x 64 only."""
    return reduced(request.param, img_size=64)


@pytest.fixture(scope='module')
def dynamic_models():
    return {family: reduced(family, img_size=64, dynamic_img_size=True) for family in FAMILIES}


BAD_IMAGES = [
    ('not a tensor', lambda: [[0.0]], TypeError, r'expected a torch.Tensor of shape \(B, 3, H, W\), got list'),
    ('3-D', lambda: torch.zeros(3, 64, 64), ValueError, r'4-D image batch .* x.unsqueeze\(0\)'),
    ('5-D', lambda: torch.zeros(1, 1, 3, 64, 64), ValueError, '4-D image batch'),
    ('uint8', lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), ValueError, r'floating-point .* x.float\(\)'),
    ('bool', lambda: torch.zeros(1, 3, 64, 64, dtype=torch.bool), ValueError, 'floating-point'),
    ('complex', lambda: torch.zeros(1, 3, 64, 64, dtype=torch.complex64), ValueError, 'floating-point'),
    (
        'float64',
        lambda: torch.zeros(1, 3, 64, 64, dtype=torch.float64),
        ValueError,
        r'images are torch.float64 but .* weights are torch.float32; convert with x.to\(torch.float32\)',
    ),
    ('float16', lambda: torch.zeros(1, 3, 64, 64, dtype=torch.float16), ValueError, 'torch.autocast'),
    (
        'meta device',
        lambda: torch.zeros(1, 3, 64, 64, device='meta'),
        ValueError,
        'images are on meta but the model is on cpu',
    ),
    ('1 channel', lambda: torch.zeros(1, 1, 64, 64), ValueError, r'3 input channels, got 1 .* in_chans=1'),
    ('empty batch', lambda: torch.zeros(0, 3, 64, 64), ValueError, 'empty batch'),
    (
        'other size',
        lambda: torch.zeros(1, 3, 96, 64),
        ValueError,
        'built for 64x64 images, got 96x64.*dynamic_img_size',
    ),
]


@pytest.mark.parametrize('case, make, error, message', BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_fail_at_the_boundary(fixed_model, case, make, error, message):
    for call in (fixed_model, fixed_model.forward_features, fixed_model.forward_intermediates):
        with pytest.raises(error, match=message) as excinfo:
            call(make())
        assert excinfo.traceback[-1].name == 'check_input'


def test_too_small_for_a_dynamic_model(dynamic_models):
    for model in dynamic_models.values():
        for size in ((16, 64), (0, 64)):
            with pytest.raises(ValueError, match=f'image size {size[0]}x{size[1]} is too small.*at least 32'):
                model(torch.zeros(1, 3, *size))


def test_other_dtype_under_autocast_is_fine(fixed_model):
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(fixed_model(torch.zeros(1, 3, 64, 64, dtype=torch.float16))).all()


image_shapes = st.one_of(
    st.lists(st.integers(0, 4), max_size=6),  # any rank, small dimensions
    st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 72), st.integers(0, 72)).map(list),
)


@settings(max_examples=40, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    shape=image_shapes,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]),
)
def test_any_input_is_accepted_or_rejected_at_the_boundary(dynamic_models, family, shape, dtype):
    model = dynamic_models[family]
    x = torch.zeros(shape, dtype=dtype)
    valid = len(shape) == 4 and shape[0] > 0 and shape[1] == 3 and min(shape[2:]) >= 32 and dtype == torch.float32
    if valid:
        with torch.no_grad():
            assert model(x).shape == (shape[0], 5)
    else:
        with pytest.raises(ValueError) as excinfo:
            model(x)
        assert excinfo.traceback[-1].name == 'check_input'


q = torch.randn(1, 2, 100, 8)
BAD_CALLS = [
    ('clustering: list', lambda: balanced_hierarchical_clustering([1.0]), TypeError, 'q must be a torch.Tensor'),
    ('clustering: 3-D', lambda: balanced_hierarchical_clustering(q[0]), ValueError, 'got a 3-D tensor'),
    ('clustering: int', lambda: balanced_hierarchical_clustering(q.long()), ValueError, 'floating-point'),
    ('clustering: no tokens', lambda: balanced_hierarchical_clustering(q[:, :, :0]), ValueError, 'at least one token'),
    (
        'clustering: cluster_size 0',
        lambda: balanced_hierarchical_clustering(q, cluster_size=0),
        ValueError,
        'cluster_size must be a positive int, got 0',
    ),
    (
        'clustering: cluster_size str',
        lambda: balanced_hierarchical_clustering(q, cluster_size='49'),
        ValueError,
        "cluster_size must be a positive int, got '49'",
    ),
    (
        'clustering: iterations',
        lambda: balanced_hierarchical_clustering(q, iterations=2.0),
        ValueError,
        'iterations must be a non-negative int, got 2.0',
    ),
    (
        'clustering: temperature nan',
        lambda: balanced_hierarchical_clustering(q, temperature=float('nan')),
        ValueError,
        'temperature must be a positive finite number, got nan',
    ),
    (
        'clustering: temperature str',
        lambda: balanced_hierarchical_clustering(q, temperature='100'),
        ValueError,
        "temperature must be a positive finite number, got '100'",
    ),
    ('fsla: list', lambda: feature_space_attention(q, [1.0], q), TypeError, 'k must be a torch.Tensor'),
    ('fsla: 3-D', lambda: feature_space_attention(q[0], q[0], q[0]), ValueError, r'\(B, heads, N, head_dim\)'),
    ('fsla: shapes', lambda: feature_space_attention(q, q[:, :, :50], q), ValueError, 'must have the same shape'),
    (
        'fsla: overlap',
        lambda: feature_space_attention(q, q, q, overlap=49),
        ValueError,
        r'overlap must be an int in \[0, cluster_size=49\), got 49',
    ),
    ('fsla: overlap float', lambda: feature_space_attention(q, q, q, overlap=2.5), ValueError, 'got 2.5'),
    (
        'fsla: cluster_size',
        lambda: feature_space_attention(q, q, q, cluster_size='a'),
        ValueError,
        "cluster_size must be a positive int, got 'a'",
    ),
    (
        'module: temperature',
        lambda: FeatureSpaceAttention(16, 2, temperature=-1.0),
        ValueError,
        'temperature must be a positive finite number, got -1.0',
    ),
    (
        'module: iterations',
        lambda: FeatureSpaceAttention(16, 2, iterations=True),
        ValueError,
        'iterations must be a non-negative int, got True',
    ),
    ('module: heads', lambda: FeatureSpaceAttention(16, 3), ValueError, 'dim=16, num_heads=3'),
    ('module: zero heads', lambda: FeatureSpaceAttention(16, 0), ValueError, 'num_heads=0'),
    ('module: zero dim', lambda: FeatureSpaceAttention(0, 1), ValueError, 'dim=0'),
    ('module: x list', lambda: FeatureSpaceAttention(16, 2)([0.0], (10, 10)), TypeError, 'x must be a torch.Tensor'),
    (
        'module: x channels',
        lambda: FeatureSpaceAttention(16, 2)(torch.zeros(1, 100, 8), (10, 10)),
        ValueError,
        r'expects \(B, N, 16\) tokens, got shape \(1, 100, 8\)',
    ),
    (
        'module: size int',
        lambda: FeatureSpaceAttention(16, 2)(torch.zeros(1, 100, 16), 10),
        TypeError,
        r'size must be the token grid \(H, W\), got 10',
    ),
    (
        'module: size product',
        lambda: FeatureSpaceAttention(16, 2)(torch.zeros(1, 100, 16), (10, 11)),
        ValueError,
        'has 110 positions but x has N=100 tokens',
    ),
    ('model: img_size', lambda: reduced('swin', img_size=16), ValueError, 'ints >= 32'),
    ('model: depths', lambda: reduced('cswin', depths=(1, 1)), ValueError, 'must have the same length'),
    ('model: num_classes', lambda: reduced('swin', num_classes=-1), ValueError, 'non-negative int'),
    ('model: in_chans', lambda: reduced('cswin', in_chans=0), ValueError, 'in_chans must be a positive int'),
    (
        'model: split_size',
        lambda: reduced('cswin', split_size=(0, 2, 7, 7)),
        ValueError,
        r'split_size must be positive ints \(stripe widths\), got \(0, 2, 7, 7\)',
    ),
    ('model: fsla_blocks', lambda: reduced('swin', fsla_blocks='every'), ValueError, "got 'every'"),
    ('model: fsla_overlap', lambda: reduced('swin', fsla_overlap=60), ValueError, 'overlap must be an int'),
    ('model: reset_classifier', lambda: reduced('swin').reset_classifier('5'), ValueError, "got '5'"),
    (
        'model: output_fmt',
        lambda: reduced('cswin').forward_intermediates(torch.zeros(1, 3, 224, 224), output_fmt='x'),
        ValueError,
        "output_fmt must be 'NCHW' or 'NHWC'",
    ),
]


@pytest.mark.parametrize('case, call, error, message', BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_fail_clearly(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_empty_batch_of_queries_is_empty():
    """Below the model (which refuses an empty batch), the functions return empty results for B = 0."""
    assert balanced_hierarchical_clustering(q[:0]).shape == (0, 2, 100)
    assert feature_space_attention(q[:0], q[:0], q[:0]).shape == (0, 2, 100, 8)


@pytest.mark.parametrize('argv', [[], ['nonsense'], ['export', '--no-such-flag']])
def test_command_line_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    assert 'usage: boatvit' in capsys.readouterr().err


@pytest.mark.parametrize(
    'argv, message',
    [
        (['train', '--device', 'gpu'], "--device 'gpu' is not a device torch knows"),
        (['train', '--device', 'mps'], 'torch has no mps device on this machine; pass --device cpu'),
    ],
)
def test_bad_devices_are_one_line_and_leave_no_run_directory(argv, message, tmp_path, capsys):
    assert cli.main([*argv, '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# 100 x 100: stage 1 has 25 x 25 = 625 tokens, padded with 7 ghosts
NON_FINITE = [
    (224, float('nan'), 'image'),
    (100, float('nan'), 'pixel'),
    (100, float('inf'), 'pixel'),
    (100, float('-inf'), 'image'),
]


@pytest.mark.parametrize('size, value, where', NON_FINITE)
@pytest.mark.parametrize('family', FAMILIES)
def test_non_finite_image_leaves_the_others_unchanged(family, size, value, where):
    model = reduced(family, img_size=size).double()
    x = torch.randn(3, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    if where == 'pixel':
        x[0, 1, size // 3, size // 2] = value
    else:
        x[0] = value
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        assert not torch.isfinite(model.forward_head(final)[0]).all()
        for i in (1, 2):
            alone_final, alone_stages = model.forward_intermediates(x[i : i + 1])
            for batched, alone in zip([final, *stages], [alone_final, *alone_stages]):
                torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('family', FAMILIES)
def test_non_finite_image_float32_other_images_bit_identical(family):
    """float32 on the CPU sorts all rows at once (one radix sort over row-offset codes): a NaN row stays in its
    range of codes, so the other images' outputs match a clean batch of the same shape bit for bit."""
    model = reduced(family, img_size=100)
    x = torch.randn(3, 3, 100, 100, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[0, :, 10:20, 30:40] = float('nan')
    with torch.no_grad():
        assert torch.equal(model(bad)[1:], model(x)[1:])


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(2, 3), st.integers(1, 2), st.integers(1, 300), st.integers(1, 8)),
    value=st.sampled_from([float('nan'), float('inf'), float('-inf')]),
    data=st.data(),
)
def test_non_finite_queries_cluster_as_a_permutation(shape, value, data):
    """Including when ghosts pad the tokens: a NaN or +inf key must still sort before them."""
    B, heads, N, d = shape
    queries = torch.randn(shape, generator=torch.Generator().manual_seed(N))
    clean = balanced_hierarchical_clustering(queries)
    token = data.draw(st.integers(0, N - 1))
    queries[0, :, token, data.draw(st.integers(0, d - 1))] = value
    order = balanced_hierarchical_clustering(queries)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(N).expand(B, heads, N))
    assert torch.equal(order[1:], clean[1:])


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize('family', FAMILIES)
def test_same_input_same_output(family):
    model = reduced(family, img_size=100)
    x = torch.randn(2, 3, 100, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize('family', FAMILIES)
def test_deterministic_algorithms(family, deterministic_algorithms):
    model = reduced(family, img_size=100, drop_path_rate=0.0)
    x = torch.randn(2, 3, 100, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    model.train()
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)


@pytest.mark.parametrize('family', FAMILIES)
def test_forward_on_the_meta_device_gives_the_shapes(family):
    name, kwargs = REDUCED_NAMES[family], reduced_kwargs(family, num_classes=NUM_CLASSES)
    with torch.device('meta'):
        model = timm.create_model(name, img_size=64, **kwargs).eval()
        images = torch.randn(3, 3, 64, 64)
    logits = model(images)
    assert logits.device.type == 'meta' and logits.shape == (3, 5)
    features = model.forward_intermediates(images, intermediates_only=True)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
