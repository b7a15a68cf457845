"""``boatvit predict --results-file``: every format read back by its own reader, a killed run resumed, torchrun's
processes leaving one file, unreadable images listed, and bad input refused with nothing overwritten."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch

from boatvit import cli, runtime
from boatvit.results_file import result_columns
from boatvit.runs import save_weights
from test_data import make_image_folder
from test_predict import expected_top

CLASSES = ['cat', 'dog', 'eel']
BROKEN = b'\xff\xd8\xff\xe0 this is not really a jpeg'
ROOT = Path(__file__).resolve().parent.parent


def weights_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model('boat_swin_nano_32', num_classes=len(CLASSES))
    save_weights(path, model.state_dict(), {'model': 'boat_swin_nano_32', 'model_kwargs': {}, 'classes': CLASSES})
    return path


@pytest.fixture(scope='module')
def nano(tmp_path_factory):
    """An untrained boat_swin_nano_32 with 3 named classes, as `boatvit train` saves weights, and the model."""
    path = weights_file(tmp_path_factory.mktemp('weights') / 'nano.safetensors', seed=0)
    torch.manual_seed(0)
    return path, timm.create_model('boat_swin_nano_32', num_classes=len(CLASSES)).eval()


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> Path:
    """7 PNGs in two sub-folders and one broken JPEG."""
    root = make_image_folder(tmp_path_factory.mktemp('photos'), {'set': {'a': 4, 'b': 3}})
    (root / 'set' / 'b' / 'broken.jpg').write_bytes(BROKEN)
    return root / 'set'


def all_images(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.rglob('*') if p.is_file())


def read_results(path: Path) -> List[Dict]:
    """The rows of a results file, each format by its own reader; CSV's empty cells as None, numbers as numbers."""
    suffix = path.suffix
    if suffix == '.csv':
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == result_columns((len(rows[0]) - 2) // 3)
        for row in rows:
            for key, value in row.items():
                row[key] = None if value == '' else int(value) if key.startswith('index') else value
                if key.startswith('probability') and value:
                    row[key] = float(value)
        return rows
    if suffix == '.jsonl':
        return [json.loads(line) for line in path.read_text().splitlines()]
    if suffix == '.json':
        return json.loads(path.read_text())
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def predict(*argv: str) -> int:
    return cli.main(['predict', *argv, '--workers', '0', '--batch-size', '4'])


def files_beside(path: Path) -> List[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize('suffix', ['.csv', '.jsonl', '.json', '.parquet'])
def test_every_format_reads_back_each_image_once_with_names_and_probabilities(tmp_path, nano, photos, suffix, capsys):
    out = tmp_path / f'out{suffix}'
    workers = '1' if suffix == '.csv' else '0'  # 1: decoded in a loader process, the broken file too
    argv = [str(photos), '--weights', str(nano[0]), '--results-file', str(out), '--topk', '2', '--batch-size', '3']
    assert cli.main(['predict', *argv, '--workers', workers]) == 0

    err = capsys.readouterr().err
    assert f'predicted 7 images, 1 failed (listed in {out})' in err and 'images/s, float32' in err
    assert files_beside(out) == [out.name, f'{out.name}.meta.json']  # no partial or shard file left
    rows = {row['image']: row for row in read_results(out)}
    assert sorted(rows) == all_images(photos) and len(read_results(out)) == 8
    broken = rows.pop(str(photos / 'b' / 'broken.jpg'))
    assert 'not a readable image' in broken['error'] and broken['name_1'] is None and broken['probability_1'] is None
    for image, row in rows.items():
        probs, indices = expected_top(nano[1], image, 2)
        assert row['error'] is None
        assert [row['index_1'], row['index_2']] == indices.tolist()
        assert [row['name_1'], row['name_2']] == [CLASSES[i] for i in indices.tolist()]
        assert [row['probability_1'], row['probability_2']] == pytest.approx(probs.tolist(), abs=1e-6)
    meta = json.loads((tmp_path / f'{out.name}.meta.json').read_text())
    assert meta['topk'] == 2 and meta['classes'] == CLASSES and meta['weights'] == str(nano[0])
    assert meta['amp'] == 'none'  # 'auto' on a CPU without bf16 units (conftest)


def test_a_killed_run_resumes_with_no_image_twice_and_none_missing(tmp_path, nano):
    folder = make_image_folder(tmp_path / 'many', {'set': {'x': 60}}) / 'set'
    out = tmp_path / 'out.csv'
    # float32 in the subprocess too, which does not see conftest's CPU without bf16 units
    common = [str(folder), '--weights', str(nano[0]), '--workers', '0', '--amp', 'none']
    argv = [*common, '--results-file', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    # one image per batch: many small writes, one of which the kill may cut
    command = [sys.executable, '-m', 'boatvit', 'predict', *argv, '--batch-size', '1']
    proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (out.exists() and out.read_bytes().count(b'\n') > 5):
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it was killed; give it more images'
    killed = out.read_bytes()
    assert 5 <= killed.count(b'\n') < 61  # the header and some rows, maybe a torn last one

    assert cli.main(['predict', *argv, '--resume']) == 0
    rows = read_results(out)
    assert sorted(row['image'] for row in rows) == all_images(folder)  # each image once
    assert out.read_bytes().startswith(killed[: killed.rfind(b'\n') + 1])  # the rows written before were kept
    # what the resumed file says is what one uninterrupted run says
    straight = tmp_path / 'straight.csv'
    assert cli.main(['predict', *common, '--results-file', str(straight)]) == 0
    expected = {row['image']: row for row in read_results(straight)}
    for row in rows:
        assert row['index_1'] == expected[row['image']]['index_1']
        assert row['probability_1'] == pytest.approx(expected[row['image']]['probability_1'], abs=1e-6)


@pytest.mark.parametrize('suffix', ['.csv', '.json'])
def test_resume_cuts_a_torn_row_and_merges_a_killed_torchrun_jobs_shards_once(tmp_path, nano, photos, suffix):
    """A torchrun job killed during its merge leaves rank files, some of whose rows are in the file already."""
    out = tmp_path / f'out{suffix}'
    first, second = all_images(photos / 'a')[:2]
    assert predict(first, '--weights', str(nano[0]), '--results-file', str(out)) == 0
    done_elsewhere = dict.fromkeys(result_columns(3), None) | {'image': second, 'name_1': 'eel', 'index_1': 2}
    done_elsewhere['probability_1'] = 0.125  # not what the model says: it must be kept, not predicted again
    shard_rows = [read_results(out)[0], done_elsewhere]  # the first in the file already
    stream = out if suffix == '.csv' else tmp_path / f'{out.name}.partial.jsonl'
    with open(stream, 'a') as f:  # a row cut short by a kill
        f.write(f'{second},cat,0,0.' if suffix == '.csv' else f'{{"image": "{second}", "name_1": "c')
    (tmp_path / f'{out.name}.rank1.partial.jsonl').write_text(
        ''.join(json.dumps(row) + '\n' for row in shard_rows) + '{"image": "/torn'
    )

    assert predict(str(photos), '--weights', str(nano[0]), '--results-file', str(out), '--resume') == 0
    rows = read_results(out)
    assert sorted(row['image'] for row in rows) == all_images(photos)
    assert next(row for row in rows if row['image'] == second)['probability_1'] == 0.125
    assert files_beside(out) == [out.name, f'{out.name}.meta.json']


def test_torchrun_two_gloo_processes_leave_one_file_with_every_image_once(tmp_path, nano, photos):
    out = tmp_path / 'out.json'
    argv = [str(photos), '--weights', str(nano[0]), '--results-file', str(out), '--device', 'cpu', '--workers', '0']
    argv += ['--amp', 'none']  # float32 in the subprocesses too, which do not see conftest's patch
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    done = subprocess.run(
        [*torchrun, '-m', 'boatvit', 'predict', *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count('predicted 7 images, 1 failed') == 1  # said once, by rank 0, for both
    rows = read_results(out)
    assert sorted(row['image'] for row in rows) == all_images(photos)
    assert files_beside(out) == [out.name, f'{out.name}.meta.json']
    for row in rows:
        if row['error'] is None:
            probs, indices = expected_top(nano[1], row['image'], 3)
            assert row['index_1'] == indices[0].item()
            assert row['probability_1'] == pytest.approx(probs[0].item(), abs=1e-6)


def test_amp_and_compile_run_and_overwrite_replaces(tmp_path, nano, photos, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: compiled.append(kw) or model)
    out = tmp_path / 'out.jsonl'
    base = [str(photos), '--weights', str(nano[0]), '--results-file', str(out)]
    assert predict(*base, '--amp', 'bf16', '--compile') == 0
    assert compiled == [{'dynamic': False}]
    assert json.loads((tmp_path / f'{out.name}.meta.json').read_text())['amp'] == 'bf16'
    rows = [row for row in read_results(out) if row['error'] is None]
    assert len(rows) == 7
    for row in rows:  # bfloat16 autocast: the float32 probabilities to about 2 decimals
        probs, _ = expected_top(nano[1], row['image'], 3)
        assert [row[f'probability_{r}'] for r in (1, 2, 3)] == pytest.approx(probs.tolist(), abs=2e-2)

    assert predict(*base, '--overwrite', '--topk', '1') == 0
    assert list(read_results(out)[0]) == result_columns(1) and len(read_results(out)) == 8


def test_auto_precision_is_bf16_with_bf16_units_and_recorded(tmp_path, nano, photos, monkeypatch, capsys):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: True)
    out = tmp_path / 'out.csv'
    assert predict(str(photos), '--weights', str(nano[0]), '--results-file', str(out), '--device', 'cpu') == 0
    assert json.loads((tmp_path / f'{out.name}.meta.json').read_text())['amp'] == 'bf16'
    assert 'images/s, bf16 autocast' in capsys.readouterr().err


@pytest.mark.parametrize(
    'case, message',
    [
        ('missing folder', 'the folder'),
        ('extension', "unknown extension '.txt'; use one of .csv, .jsonl, .json, .parquet"),
        ('exists', 'already exists; pass --resume to predict only the images it lacks, --overwrite'),
        ('other weights', 'it was written for the weights'),
        ('other topk', 'it was written with --topk 5, not 2; pass --topk 5'),
        ('no record', 'there is no out.csv.meta.json beside it'),
        ('resume alone', '--resume applies to a --results-file'),
        ('torchrun, no file', 'under torchrun pass --results-file'),
        ('no pyarrow', "a .parquet results file needs pyarrow, which is not installed; pip install 'boatvit[parquet]'"),
    ],
)
def test_bad_input_is_refused_by_name_and_nothing_is_overwritten(
    tmp_path, nano, photos, case, message, capsys, monkeypatch
):
    out = tmp_path / 'out.csv'
    out.write_text('image,name_1\nkeep,me\n')
    (tmp_path / 'out.csv.meta.json').write_text(json.dumps({'weights_sha256': 'x', 'topk': 5}))
    weights = nano[0]
    argv = [str(photos), '--results-file', str(out)]
    if case == 'missing folder':
        argv[2] = str(tmp_path / 'nowhere' / 'out.csv')
    elif case == 'extension':
        argv[2] = str(tmp_path / 'out.txt')
    elif case in ('other weights', 'other topk', 'no record'):
        assert predict(str(photos / 'a'), '--weights', str(nano[0]), '--results-file', str(out), '--overwrite') == 0
        argv.append('--resume')
        if case == 'other weights':
            weights = weights_file(tmp_path / 'other.safetensors', seed=1)
        elif case == 'other topk':
            argv += ['--topk', '2']
        else:
            (tmp_path / 'out.csv.meta.json').unlink()
    elif case == 'resume alone':
        argv[1:3] = ['--resume']
    elif case == 'torchrun, no file':
        monkeypatch.setenv('WORLD_SIZE', '2')
        argv[1:3] = []
    elif case == 'no pyarrow':
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, 'find_spec', lambda name, *a: None if name == 'pyarrow' else find_spec(name)
        )
        argv[2] = str(tmp_path / 'out.parquet')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    assert predict(*argv, '--weights', str(weights)) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
