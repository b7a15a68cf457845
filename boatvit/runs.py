"""What a training run writes and reads back: its directory, weights, resumable state, metrics and curves.

A run directory holds::

    config.json                      the configuration it ran with, plus derived values (lr, world size, classes)
    metrics.csv, metrics.json        one row per finished epoch
    curves.png                       loss, learning rate and accuracy per epoch
    last.safetensors, last.pt        weights and resumable state after the latest finished epoch
    best.safetensors, best.pt        the same for the epoch with the best validation top-1

Every file is written atomically (`atomic_path`): a crash while saving leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from safetensors.torch import save_file

from .errors import UsageError
from .runtime import require_extra

CONFIG_FILE = 'config.json'
STATE_SUFFIX = '.pt'
WEIGHTS_SUFFIX = '.safetensors'


@contextlib.contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the body has written it, fsync it and rename it over ``path``.

    The rename is atomic on POSIX and Windows, so readers (and a later resume) see either the old file or the
    complete new one. The temporary file sits in the same directory because a rename across file systems is a copy.
    """
    path = Path(path)
    # named per process so concurrent writers never share one; created by the writer with the usual permissions
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if hasattr(os, 'O_DIRECTORY'):
        # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + '\n')


def save_weights(path: os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Save a state dict as safetensors; ``metadata`` values are stored JSON-encoded (safetensors keeps strings) and
    read back, validated, by `boatvit.weights.read_weights`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})


def save_state(path: os.PathLike, state: Mapping[str, Any]) -> None:
    """Save the resumable training state (optimizer, scheduler, RNG, ...) with ``torch.save``."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_state(path: os.PathLike) -> Dict[str, Any]:
    """Load a `save_state` file; ``weights_only`` keeps a tampered file from running code."""
    return torch.load(path, map_location='cpu', weights_only=True)


def save_checkpoint(
    run_dir: os.PathLike,
    weights: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    state: Mapping[str, Any],
    best: bool,
) -> None:
    """Write ``last.safetensors`` and ``last.pt``, and the same as ``best.*`` when this epoch is the best so far.

    Each file is replaced atomically; a resume reads only ``last.pt``, so a crash between the files at worst
    repeats one epoch.
    """
    run_dir = Path(run_dir)
    for prefix in ('last', 'best') if best else ('last',):
        save_weights(run_dir / f'{prefix}{WEIGHTS_SUFFIX}', weights, metadata)
        save_state(run_dir / f'{prefix}{STATE_SUFFIX}', state)


def write_metrics(run_dir: os.PathLike, history: List[Mapping[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` and ``metrics.json`` with one row per finished epoch."""
    run_dir = Path(run_dir)
    write_json(run_dir / 'metrics.json', list(history))
    fields = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(run_dir / 'metrics.csv') as tmp:
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)


def plot_curves(path: os.PathLike, history: List[Mapping[str, Any]]) -> None:
    """Plot loss, learning rate and accuracy per epoch into a PNG."""
    # imported here because only rank 0 plots, matplotlib is slow to import and optional; a bare Figure draws
    # without pyplot's global state or a display
    require_extra('matplotlib', 'matplotlib', 'plotting training curves')
    from matplotlib.figure import Figure

    epochs = [row['epoch'] for row in history]
    panels = (
        ('loss', ('train_loss', 'val_loss', 'val_loss_ema')),
        ('learning rate', ('lr',)),
        ('accuracy (%)', ('val_top1', 'val_top5', 'val_top1_ema')),
    )
    fig = Figure(figsize=(4 * len(panels), 3.2), layout='constrained')
    for ax, (title, keys) in zip(fig.subplots(1, len(panels)), panels):
        for key in keys:
            if key in history[0]:
                ax.plot(epochs, [row[key] for row in history], marker='.', label=key)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def read_run_config(run_dir: os.PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a run directory, or a `UsageError` if the directory is not a run."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f'{str(run_dir)!r} is not a run directory (no {CONFIG_FILE}); pass the directory train wrote')
    return json.loads(path.read_text())


def new_run_dir(output: os.PathLike, name: Optional[str], default_name: str) -> Path:
    """Create a fresh run directory ``output/name``; without a name, ``default_name`` gets a numeric suffix if taken."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if name:
        run_dir = output / name
        if run_dir.exists():
            raise UsageError(
                f'run directory {str(run_dir)!r} exists; pass --resume {run_dir} to continue it or another --name'
            )
        run_dir.mkdir()
        return run_dir
    for i in range(1000):
        run_dir = output / (default_name if i == 0 else f'{default_name}-{i}')
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
    raise UsageError(f'too many runs named {default_name!r} in {str(output)!r}; pass --name')
