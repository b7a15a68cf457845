"""ONNX export: both families at 224 against PyTorch through ONNX Runtime, the sort sizes against TensorRT's TopK
limit, and ``boatvit export`` (weights, another size, atomic write, failed check, bad arguments)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import types
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from onnx import numpy_helper

import boatvit
import boatvit.export
from boatvit import cli
from boatvit.clustering import cluster_layout
from boatvit.export import TENSORRT_TOPK_LIMIT, export_onnx, fsla_sorts, trace_onnx
from boatvit.runs import save_weights

from reduced_models import FAMILIES, NUM_CLASSES, reduced, reduced_kwargs

# FSLA in stages 1 to 3 (Swin: the second block of each; at 224 stage 4 is no larger than the window) or 1 to 4
# fewer blocks than the shared reduced models where no FSLA sits (export time grows with the graph)
FEWER_BLOCKS = {'swin': dict(depths=(2, 2, 2, 1)), 'cswin': dict(depths=(1, 1, 1, 1))}


def export_model(family: str, **kwargs) -> boatvit.models.BoatTransformer:
    return reduced(family, **FEWER_BLOCKS[family], **kwargs)


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {'images': images.numpy()})[0]


def topk_sizes(proto: onnx.ModelProto) -> List[int]:
    """K of every TopK node (K is a constant input: an initializer or a Constant node)."""
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == 'Constant':
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return [int(np.asarray(constants[n.input[1]]).reshape(-1)[0]) for n in proto.graph.node if n.op_type == 'TopK']


@pytest.mark.slow
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_export_at_224_matches_pytorch(family, tmp_path):
    model = export_model(family)
    result = export_onnx(model, tmp_path / 'model.onnx')  # checked on up to 3 batches (near-tied splits)
    proto = onnx.load(tmp_path / 'model.onnx')
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[''] >= 17
    # every clustering level is one TopK over the groups' tokens; the Swin shift left no Roll-like custom op
    assert Counter(n.op_type for n in proto.graph.node)['TopK'] == sum(
        cluster_layout(s.tokens).levels for s in result.sorts
    )
    assert all(n.domain in ('', 'ai.onnx') for n in proto.graph.node)
    # the README's figure: the largest sort at 224 is stage 1's 56 x 56 = 3136 tokens
    assert max(topk_sizes(proto)) == result.largest_sort.topk == 3136 <= TENSORRT_TOPK_LIMIT
    assert result.fits_tensorrt
    for batch in (1, 3):  # the batch axis is dynamic; near-tied splits again allow 3 inputs
        for seed in range(3):
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                expected = model(images).numpy()
            if np.allclose(run_onnx(tmp_path / 'model.onnx', images), expected, rtol=1e-4, atol=1e-4):
                break
        else:
            pytest.fail(f'ONNX Runtime differs from PyTorch at batch {batch} on 3 random inputs')


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_largest_square_size_within_tensorrt_limit(family):
    """README: square images up to 244 keep every sort within 3840 (stage 1: 61 x 61 = 3721 tokens, padded to
    64 clusters of 59); 248 does not (62 x 62 = 3844, padded to 64 x 61 = 3904)."""
    model = export_model(family, dynamic_img_size=True)
    below = fsla_sorts(model, torch.zeros(1, 3, 244, 244))
    above = fsla_sorts(model, torch.zeros(1, 3, 248, 248))
    assert max(s.topk for s in below) == 3776 <= TENSORRT_TOPK_LIMIT
    assert max(s.topk for s in above) == 3904 > TENSORRT_TOPK_LIMIT


def test_trace_onnx_rejects_bad_arguments():
    with pytest.raises(TypeError, match='torch.nn.Module'):
        trace_onnx('model', torch.randn(1, 3, 32, 32), dynamic_batch=False, opset=18)
    with pytest.raises(ValueError, match=r'\(batch, channels, height, width\) tensor, got \(3, 32, 32\)'):
        trace_onnx(torch.nn.Identity(), torch.randn(3, 32, 32), dynamic_batch=False, opset=18)
    with pytest.raises(ValueError, match='opset must be an int >= 17'):
        trace_onnx(torch.nn.Identity(), torch.randn(1, 3, 32, 32), dynamic_batch=False, opset=13)


def test_export_rejects_bad_arguments(tmp_path):
    model = export_model('swin', img_size=64)
    out = tmp_path / 'model.onnx'
    with pytest.raises(TypeError, match='boatvit BOAT model'):
        export_onnx(torch.nn.Linear(2, 2), out)
    with pytest.raises(ValueError, match=r'float32 model on the CPU.*model.float\(\)'):
        export_onnx(export_model('swin', img_size=64).half(), out)
    with pytest.raises(ValueError, match='batch_size must be a positive int'):
        export_onnx(model, out, batch_size=0)
    with pytest.raises(ValueError, match='opset must be an int >= 17'):
        export_onnx(model, out, opset=13)
    with pytest.raises(ValueError, match='check_batches must be a positive int, got 0'):
        export_onnx(model, out, check_batches=0)
    with pytest.raises(ValueError, match="seed must be an int, got '0'"):
        export_onnx(model, out, seed='0')
    with pytest.raises(ValueError, match='img_size takes one positive int'):
        export_onnx(model, out, img_size='64')
    with pytest.raises(ValueError, match='built for 64x64 images, got 96x96'):
        export_onnx(model, out, img_size=96)
    with pytest.raises(ValueError, match='existing directory'):
        export_onnx(model, tmp_path / 'missing' / 'model.onnx')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_with_weights_at_another_size(tmp_path, capsys):
    """Weights trained at 224 exported at 120 x 120 (stage 1: 900 tokens, padded with 12 ghosts): the file runs in
    ONNX Runtime like the trained network taking 120 x 120 images in PyTorch (``dynamic_img_size``, the trained
    windows), records the model and its data config, and eager use still works after the export (a cached index
    tensor built while tracing used to be a fake tensor)."""
    name, kwargs = FAMILIES['swin'], reduced_kwargs('swin', **FEWER_BLOCKS['swin'], num_classes=NUM_CLASSES)
    kwargs = dict(kwargs, fsla_overlap=13)  # index tables no other test has cached
    trained = timm.create_model(name, **kwargs)
    weights, out = tmp_path / 'weights.safetensors', tmp_path / 'model.onnx'
    save_weights(weights, trained.state_dict(), {'model': name, 'model_kwargs': kwargs})

    assert cli.main(['export', '--weights', str(weights), '--img-size', '120', '-o', str(out)]) == 0
    assert 'ONNX Runtime matches PyTorch' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx', 'weights.safetensors']

    proto = onnx.load(out)
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props['model'] == name and props['boatvit_version'] == boatvit.__version__
    assert props['data_config']['input_size'] == [3, 120, 120]
    model = timm.create_model(name, **dict(kwargs, dynamic_img_size=True)).eval()
    model.load_state_dict(trained.state_dict())
    images = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
    assert type(expected) is torch.Tensor
    np.testing.assert_allclose(run_onnx(out, images), expected.numpy(), rtol=1e-4, atol=1e-4)


def _off_by_one_runs(monkeypatch, runs: int) -> None:
    """ONNX Runtime sessions whose first ``runs`` runs (counted over all sessions) return every output plus 1."""
    real_session, done = onnxruntime.InferenceSession, []

    class OffByOne:
        def __init__(self, *args, **kwargs):
            self.session = real_session(*args, **kwargs)

        def run(self, *args, **kwargs):
            done.append(1)
            return [y + (len(done) <= runs) for y in self.session.run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, 'InferenceSession', OffByOne)


def test_cli_export_passes_at_the_first_check_batch_that_matches(tmp_path, capsys, monkeypatch):
    """A check batch that differs (as at a near-tied split) is followed by the next seed's, and the export says so."""
    _off_by_one_runs(monkeypatch, runs=2)
    out = tmp_path / 'model.onnx'
    argv = ['export', '--model', 'boat_swin_nano_32', '--batch-size', '1', '--seed', '5', '-o', str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert 'ONNX Runtime matches PyTorch' in printed and 'check batch seed 7' in printed
    assert 'check batch(es) of seed 5 (max |diff| 1), 6 (max |diff| 1) differed' in printed
    assert out.is_file()
    _off_by_one_runs(monkeypatch, runs=1)
    result = export_onnx(timm.create_model('boat_swin_nano_32').eval(), out, check_batches=2)
    assert result.check_seed == 1 and [s for s, _ in result.differing_checks] == [0]
    assert result.differing_checks[0][1] == pytest.approx(1.0, abs=1e-3)


def test_the_conv_stem_model_exports_and_onnx_runtime_matches_it(tmp_path):
    # BatchNorm with running statistics unlike its defaults, so that a stem exported in training mode would differ
    model = timm.create_model('boat_swin_nano_convstem_32', dynamic_img_size=True)
    with torch.no_grad():
        for module in model.patch_embed.proj:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    result = export_onnx(model.eval(), tmp_path / 'model.onnx', img_size=(40, 48), batch_size=2)
    assert result.input_shape == (2, 3, 40, 48) and result.max_abs_diff < 1e-4 and result.path.is_file()


def test_cli_export_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    _off_by_one_runs(monkeypatch, runs=10**9)
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'previous file')
    assert cli.main(['export', '--model', 'boat_swin_nano_32', '--batch-size', '1', '-o', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'check failed' in err and 'differs from PyTorch on all 3 random (1, 3, 32, 32) batches' in err
    assert 'by up to 1 (seed 0), 1 (seed 1), 1 (seed 2)' in err
    assert out.read_bytes() == b'previous file'  # the old file is untouched, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']


@pytest.mark.parametrize(
    'argv, message',
    [
        ([], 'pass --model NAME'),
        (['--model', 'resnet18'], "'resnet18' is not a BOAT model"),
        (['--model', 'boat_swin_tiny_224', '--img-size', '0'], '--img-size takes one positive int'),
        (['--model', 'boat_swin_tiny_224', '--img-size', '16'], 'ints >= 32'),
        (['--model', 'boat_swin_tiny_224', '--batch-size', '0'], '--batch-size must be a positive integer'),
        (['--model', 'boat_swin_tiny_224', '--opset', '16'], '--opset must be at least 17'),
        (['--model', 'boat_swin_tiny_224', '--atol', '0'], '--atol must be positive'),
        (['--model', 'boat_swin_tiny_224', '--check-batches', '0'], '--check-batches must be a positive integer'),
        (['--model', 'boat_swin_tiny_224', '--weights', 'missing.safetensors'], 'missing.safetensors'),
        (['--model', 'boat_swin_tiny_224', '--model-kwargs', 'depths=(2,2)'], 'same length'),
    ],
)
def test_cli_export_bad_arguments(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['export', *argv, '-o', 'model.onnx']) == 2
    err = capsys.readouterr().err
    assert err.startswith('boatvit export: error: ') and message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_weights_at_a_size_too_small(tmp_path, capsys):
    weights = tmp_path / 'nano.safetensors'
    save_weights(weights, timm.create_model('boat_swin_nano_32').state_dict(), {'model': 'boat_swin_nano_32'})
    argv = ['export', '--weights', str(weights), '--img-size', '8', '-o', str(tmp_path / 'model.onnx')]
    assert cli.main(argv) == 2
    assert '--img-size 8 is too small: boat_swin_nano_32 takes images of at least 16' in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ['nano.safetensors']


@pytest.mark.parametrize('output', ['missing/model.onnx', '.'])
def test_cli_export_bad_output(output, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['export', '--model', 'boat_swin_nano_32', '-o', output]) == 2
    assert 'existing directory' in capsys.readouterr().err


def test_cli_export_without_onnx_packages(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None if name == 'onnxruntime' else find_spec(name))
    assert cli.main(['export', '--model', 'boat_swin_nano_32', '-o', str(tmp_path / 'model.onnx')]) == 2
    assert 'pip install "boatvit[onnx]"' in capsys.readouterr().err


def test_cli_export_to_a_full_disk_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    class FullDiskProgram:
        model = types.SimpleNamespace(metadata_props={})

        def save(self, path, external_data):
            Path(path).write_bytes(b'partial')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # the tracing is not what is tested: a program whose save meets a full disk
    monkeypatch.setattr(boatvit.export, 'trace_onnx', lambda *args, **kwargs: FullDiskProgram())
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'previous file')
    assert cli.main(['export', '--model', 'boat_swin_nano_32', '--batch-size', '1', '-o', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'boatvit export: error: could not write {out}: No space left on device (')
    assert 'MiB free' in err and err.endswith('the previous one is intact') and len(err.splitlines()) == 1
    assert out.read_bytes() == b'previous file' and [p.name for p in tmp_path.iterdir()] == ['model.onnx']
