import pytest
import torch

import boatvit
from boatvit.checkpoint import detect_family, select_state_dict
from boatvit.weights import convert_state_dict

from full_size import MANIFEST, MANIFEST_NAMES, REFERENCE_PARAMS, full_size_model


@pytest.mark.parametrize('name', REFERENCE_PARAMS)
def test_full_size_model_equals_reference_manifest(name):
    """Parameter count equals the reference, and every reference key maps one-to-one onto ours."""
    model = full_size_model(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]
    entry = MANIFEST[MANIFEST_NAMES[name]]
    assert entry['params'] == REFERENCE_PARAMS[name]
    reference = {k: torch.zeros(shape) for k, shape in entry['parameters'].items()}
    for k, spec in entry['buffers'].items():
        reference[k] = torch.zeros(spec['shape'], dtype=getattr(torch, spec['dtype']))
    ours = model.state_dict()
    mapped = convert_state_dict(reference, model)
    assert len(mapped) == len(entry['parameters']) == len(ours)
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == v.shape for k, v in ours.items())
    if 'swin_' in name and 'cswin' not in name:
        # the shifted blocks of stages 1-3 carry FSLA, stage 4 (7x7 = window) none
        fsla = [k for k in ours if k.endswith('fsla.qkv.weight')]
        assert all(not k.startswith('layers.3') for k in fsla)


def test_load_reference_weights_from_training_dicts(swin_fixture, cswin_fixture):
    for fixture, wrap in (
        (swin_fixture, lambda sd: {'model': sd, 'epoch': 3}),
        (
            cswin_fixture,
            lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}, 'state_dict_ema': sd, 'epoch': 3},
        ),
    ):
        model = fixture.build()  # reference weights, loaded from the bare dict
        fresh = type(model)(**fixture.model_kwargs()).double()
        result = boatvit.load_reference_weights(fresh, wrap(fixture.state_dict))
        assert result.num_tensors == len(model.state_dict())
        assert result.entry == ('model' if fixture is swin_fixture else 'state_dict_ema')
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k


def test_select_state_dict_prefers_ema_unless_told_not_to():
    raw, ema = {'module.a': torch.zeros(1)}, {'a': torch.ones(1)}
    ckpt = {'state_dict': raw, 'state_dict_ema': ema, 'args': object()}
    assert select_state_dict(ckpt)[0] == 'state_dict_ema'
    entry, sd = select_state_dict(ckpt, use_ema=False)
    assert entry == 'state_dict' and list(sd) == ['a'] and sd['a'].item() == 0


def test_strict_loading_lists_missing_and_unexpected_keys(swin_fixture):
    model = swin_fixture.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(swin_fixture.state_dict)
    del sd['layers.0.blocks.1.attnC.get_v.weight']
    sd['layers.0.blocks.1.extra.weight'] = torch.zeros(1)
    sd['norm.weight'] = torch.full_like(sd['norm.weight'], 7.0)
    with pytest.raises(ValueError, match=r'(?s)nothing was loaded.*missing.*fsla\.lepe\.weight.*unexpected.*extra'):
        boatvit.load_reference_weights(model, sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize('dtype', [torch.int64, torch.bool])
def test_integer_or_boolean_weights_are_refused_not_cast(swin_fixture, tmp_path, dtype):
    """load_state_dict would cast them silently; the message names the tensor and both dtypes, through every path
    (a loaded dict, and a converted .safetensors file read by the weights module)."""
    model = swin_fixture.build()
    sd = dict(swin_fixture.state_dict)
    sd['norm.weight'] = torch.ones_like(sd['norm.weight'], dtype=dtype)
    with pytest.raises(ValueError, match=rf'another kind of number.*norm\.weight: checkpoint {dtype} vs model'):
        boatvit.load_reference_weights(model, sd)
    from boatvit.runs import save_weights
    from boatvit.weights import load_model

    state = {k: v.float() for k, v in model.state_dict().items()}
    state['norm.weight'] = state['norm.weight'].to(dtype)
    path = tmp_path / 'weights.safetensors'
    save_weights(path, state, {'model': 'boat_swin_tiny_224', 'model_kwargs': swin_fixture.model_kwargs()})
    with pytest.raises(ValueError, match=r'norm\.weight'):
        load_model(path)


def test_other_family_is_refused(swin_fixture, cswin_fixture):
    with pytest.raises(ValueError, match='BOAT-CSWin weights but the model is BOAT-Swin'):
        boatvit.load_reference_weights(swin_fixture.build(), cswin_fixture.state_dict)
    with pytest.raises(ValueError, match='cannot tell the model family'):
        detect_family({'fc.weight': torch.zeros(1)})


def test_non_state_dicts_are_refused(swin_fixture):
    model = swin_fixture.build()
    with pytest.raises(ValueError, match='not a state dict'):
        boatvit.load_reference_weights(model, {'model': {'a': 'text'}})
    with pytest.raises(ValueError, match='empty'):
        boatvit.load_reference_weights(model, {})
