"""Tests for boatvit.evaluation: the metrics against hand-computed values, and `boatvit eval` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import boatvit  # noqa: F401  registers the BOAT models
from boatvit import runtime
from boatvit.cli import main
from boatvit.evaluation import evaluate
from test_data import make_image_folder

# boat_swin_nano_32 cut down so a test runs in about a second
TINY_KWARGS = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
TINY_FLAGS = ['--model-kwargs', *(f'{k}={v}' for k, v in TINY_KWARGS.items())]


class FixedLogits(torch.nn.Module):
    """Returns the logits stored for each input; inputs are the row indices."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index]


def test_evaluate_counts_top1_top5_and_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 7, generator=gen)
    targets = torch.randint(0, 7, (23,), generator=gen)
    loader = [(torch.arange(i, min(i + 5, 23)), targets[i : i + 5]) for i in range(0, 23, 5)]
    result = evaluate(FixedLogits(logits), loader, torch.device('cpu'))
    rank = (logits > logits.gather(1, targets[:, None])).sum(1)  # how many classes beat the true one
    assert result['images'] == 23
    assert result['top1'] == pytest.approx(100 * (rank == 0).float().mean().item())
    assert result['top5'] == pytest.approx(100 * (rank < 5).float().mean().item())
    assert result['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert result['images_per_s'] > 0


def test_eval_on_image_folder_matches_independent_accuracy(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'data', {'val': {'a': 5, 'b': 4, 'c': 6}}, size=32)
    torch.manual_seed(0)
    model = timm.create_model('boat_swin_nano_32', num_classes=3, **TINY_KWARGS).eval()
    weights = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), str(weights))  # no boatvit metadata: eval must be told the model

    assert (
        main(
            [
                'eval',
                '--data',
                str(root),
                '--model',
                'boat_swin_nano_32',
                *TINY_FLAGS,
                '--weights',
                str(weights),
                '--batch-size',
                '4',
                '--workers',
                '0',
                '--json',
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)

    # independently: 32x32 PNGs need no resize or crop for this model, so the transform is ToTensor + Normalize
    mean, std = (np.array(model.pretrained_cfg[k], dtype=np.float32) for k in ('mean', 'std'))
    images, targets = [], []
    for label, name in enumerate('abc'):
        for path in sorted((root / 'val' / name).iterdir()):
            images.append((np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255 - mean) / std)
            targets.append(label)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    targets = torch.tensor(targets)
    assert result['images'] == 15
    assert result['top1'] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert result['top5'] == 100.0  # 3 classes
    assert result['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-4)
    assert result['amp'] == 'none'  # 'auto' on a CPU without bf16 units (conftest)


@pytest.mark.parametrize(
    'units, flags, amp', [(True, [], 'bf16'), (True, ['--amp', 'none'], 'none'), (False, [], 'none')]
)
def test_eval_precision_follows_auto_and_is_reported(tmp_path, capsys, monkeypatch, units, flags, amp):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: units)
    root = make_image_folder(tmp_path / 'data', {'val': {'a': 2, 'b': 2}}, size=32)
    torch.manual_seed(0)
    weights = tmp_path / 'w.safetensors'
    save_file(timm.create_model('boat_swin_nano_32', num_classes=2, **TINY_KWARGS).state_dict(), str(weights))
    argv = ['eval', '--data', str(root), '--model', 'boat_swin_nano_32', *TINY_FLAGS, '--weights', str(weights)]
    argv += ['--workers', '0', '--device', 'cpu', *flags]
    assert main([*argv, '--json']) == 0
    assert json.loads(capsys.readouterr().out)['amp'] == amp
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip().endswith('bf16 autocast' if amp == 'bf16' else 'float32')


def test_eval_rejects_weights_of_another_model(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'data', {'val': {'a': 1, 'b': 1}})
    weights = tmp_path / 'w.safetensors'
    save_file(timm.create_model('boat_swin_nano_32', num_classes=2, **TINY_KWARGS).state_dict(), str(weights))
    assert main(['eval', '--data', str(root), '--model', 'boat_swin_nano_32', '--weights', str(weights)]) == 2
    err = capsys.readouterr().err
    assert 'does not match the model; nothing was loaded' in err and 'another shape' in err and '--model' in err


@pytest.mark.parametrize(
    'flags, message',
    [
        (['--model', 'boat_swin_nan'], "'boat_swin_nan' is not a BOAT model; did you mean boat_swin_nano_32"),
        (
            ['--model', 'boat_swin_nano_32', '--data', 'missing-dir', *TINY_FLAGS],
            "data directory 'missing-dir' does not exist",
        ),
        ([], 'cannot tell the model family from the checkpoint keys'),
    ],
)
def test_eval_usage_errors(tmp_path, capsys, flags, message):
    """The weights are checked first (a wrong file is the first thing to hear about), then the data."""
    weights = tmp_path / 'w.safetensors'
    if 'missing-dir' in flags:
        save_file(timm.create_model('boat_swin_nano_32', num_classes=10, **TINY_KWARGS).state_dict(), str(weights))
    else:
        save_file({'x': torch.zeros(1)}, str(weights))
    assert main(['eval', '--weights', str(weights), '--data', 'digits', *flags]) == 2
    assert message in capsys.readouterr().err
