"""timm's factory arguments ``device`` and ``dtype`` (issue 17): building on the meta device, then ``to_empty`` and a
state dict, gives the model a normal build gives; ``dtype`` creates every parameter in that dtype."""

import pytest
import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers

import boatvit

from reduced_models import FAMILIES, reduced_kwargs

CLASSES = {'swin': boatvit.BoatSwinTransformer, 'cswin': boatvit.BoatCSWinTransformer}
# fixed non-square size (BOAT-Swin's masks are buffers built for it) and any size (masks built per call)
BUILDS = [dict(img_size=(96, 128)), dict(dynamic_img_size=True)]


def _materialise(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """timm's recipe after a meta build: allocate, load the weights, recompute the non-persistent buffers."""
    model.to_empty(device='cpu')
    model.load_state_dict(state_dict)
    reinit_non_persistent_buffers(model)
    return model.eval()


def _assert_same_model(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    buffers = dict(reference.named_buffers())
    assert buffers.keys() == dict(model.named_buffers()).keys()
    for name, buffer in model.named_buffers():  # Swin's relative_position_index and attn_mask, recomputed
        assert torch.equal(buffer, buffers[name]), name
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize('build', BUILDS, ids=['fixed', 'dynamic'])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_create_model_on_meta_then_load_gives_the_normal_model(family, build):
    name, args = FAMILIES[family], reduced_kwargs(family, num_classes=5)
    torch.manual_seed(0)
    reference = timm.create_model(name, **args, **build).eval()
    model = timm.create_model(name, device='meta', **args, **build)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    _assert_same_model(_materialise(model, reference.state_dict()), reference)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_build_under_the_meta_device_context(family):
    cls, args = CLASSES[family], reduced_kwargs(family, num_classes=5)
    torch.manual_seed(0)
    reference = cls(**args, img_size=(96, 128)).eval()
    with torch.device('meta'):
        model = cls(**args, img_size=(96, 128))
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    _assert_same_model(_materialise(model, reference.state_dict()), reference)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_dtype_creates_every_parameter_in_that_dtype(family):
    name, args = FAMILIES[family], reduced_kwargs(family, num_classes=5)
    model = timm.create_model(name, dtype=torch.float64, **args).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    # floating buffers (Swin's attention masks) follow; the relative position index stays an integer index
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} <= {torch.float64}
    reference = timm.create_model(name, **args).double().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    model.reset_classifier(3)
    assert model.head.fc.weight.dtype == torch.float64


def test_fsla_backend_reaches_every_fsla():
    for family, name in FAMILIES.items():
        args = reduced_kwargs(family)
        model = timm.create_model(name, fsla_backend='torch', **args)
        fslas = [m for m in model.modules() if isinstance(m, boatvit.FeatureSpaceAttention)]
        assert fslas and {m.backend for m in fslas} == {'torch'}, family
        default = timm.create_model(name, **args)
        assert {m.backend for m in default.modules() if isinstance(m, boatvit.FeatureSpaceAttention)} == {None}
