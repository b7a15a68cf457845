"""What a training run writes and reads back: its directory, weights, resumable state, metrics and curves.

A run directory holds::

    config.json                      the configuration it ran with, plus derived values (lr, world size, classes)
    metrics.csv, metrics.json        one row per finished epoch
    curves.png                       loss, learning rate and accuracy per epoch
    last.safetensors, last.pt        weights and resumable state after the latest finished epoch
    best.safetensors, best.pt        the same for the epoch with the best validation top-1
    train.lock                       held by the process training the run (`hold_run_dir`); its pid inside

Every file is written atomically (`atomic_path`): a crash while saving leaves the previous file intact, and a write
that fails (a full disk) is an `OutputWriteError` naming the file and the free space, with no temporary file left.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import CheckpointFileError, OutputWriteError, UsageError
from .runtime import require_extra

CONFIG_FILE = 'config.json'
LOCK_FILE = 'train.lock'
STATE_SUFFIX = '.pt'
WEIGHTS_SUFFIX = '.safetensors'
# what the writers say when a write fails: OSError carries an errno; safetensors' SafetensorError wraps the OS
# error in its text; torch.save's zip writer reports a short write as an '[enforce fail at inline_container.cc]'
_WRITE_FAILURE_TEXT = ('No space left', 'StorageFull', 'Disk quota', 'inline_container', 'file write failed')
_DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))  # no EDQUOT on Windows


def _write_failure(error: BaseException) -> Optional[str]:
    """Why writing a file failed, if ``error`` is a failed write; None for any other error."""
    if isinstance(error, OSError):
        return os.strerror(error.errno) if error.errno in _DISK_FULL_ERRNOS else str(error)
    text = str(error)
    if isinstance(error, (RuntimeError, SafetensorError)) and any(word in text for word in _WRITE_FAILURE_TEXT):
        return text
    return None


def _free_space(directory: Path) -> str:
    try:
        return f'{shutil.disk_usage(directory).free / 2**20:.1f} MiB free'
    except OSError:
        return 'free space unknown'


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
    except Exception as e:
        reason = _write_failure(e)
        if reason is None:
            raise
        previous = 'the previous one is intact' if path.exists() else 'nothing was written'
        raise OutputWriteError(
            f'could not write {path}: {reason} ({_free_space(path.parent)} in {path.parent}); {previous}'
        ) from e
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
    """Load a `save_state` file; ``weights_only`` keeps a tampered file from running code.

    Raises:
        CheckpointFileError: the file is empty, truncated or not a state `save_state` wrote; the message says what
            to do instead (resume from ``best.pt``, or start anew).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load says a broken zip or pickle in many ways: EOFError, RuntimeError, ...
        problem = 'is empty' if path.stat().st_size == 0 else f'cannot be read ({type(e).__name__}: {e})'
        raise CheckpointFileError(f'{path} {problem}; {_recovery(path)}') from e
    if not isinstance(state, dict) or not {'epoch', 'trainer', 'rng', 'history'} <= state.keys():
        raise CheckpointFileError(f'{path} is not a resumable training state; {_recovery(path)}')
    return state


def _recovery(path: Path) -> str:
    """What to do about an unreadable state file of a run."""
    best = path.with_name(f'best{STATE_SUFFIX}')
    if path.name != best.name and best.is_file():
        return (
            f'resume from the best epoch instead (cp {best} {path}; cp {best.with_suffix(WEIGHTS_SUFFIX)}'
            f' {path.with_suffix(WEIGHTS_SUFFIX)}) or start the run anew'
        )
    return 'start the run anew'


def save_checkpoint(
    run_dir: os.PathLike,
    weights: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    state: Mapping[str, Any],
    best: bool,
) -> None:
    """Write ``last.safetensors`` and ``last.pt``, and the same as ``best.*`` when this epoch is the best so far.

    Each file is replaced atomically; a resume reads only ``last.pt``, so a crash between the files at worst
    repeats one epoch. A failed write is an `OutputWriteError` that says which epoch ``last.pt`` still holds.
    """
    run_dir = Path(run_dir)
    epoch = state['epoch']
    last_pt = run_dir / f'last{STATE_SUFFIX}'
    saved = []
    try:
        for prefix in ('last', 'best') if best else ('last',):
            save_weights(run_dir / f'{prefix}{WEIGHTS_SUFFIX}', weights, metadata)
            save_state(run_dir / f'{prefix}{STATE_SUFFIX}', state)
            saved.append(prefix)
    except OutputWriteError as e:
        if saved or last_pt.exists():
            # every epoch is saved, so last.pt holds this epoch once written, else the one before
            held = epoch if saved else epoch - 1
            kept = f'{last_pt} holds epoch {held}: free some space and continue with --resume {run_dir}'
        else:
            kept = 'no checkpoint was saved before'
        raise OutputWriteError(f'saving the checkpoint of epoch {epoch} failed: {e}; {kept}') from e


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
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointFileError(
            f'{path} is not valid JSON ({e}); the run cannot be resumed without it: start it anew'
        ) from e


def new_run_dir(output: os.PathLike, name: Optional[str], default_name: str) -> Path:
    """Create a fresh run directory ``output/name``; without a name, ``default_name`` gets a numeric suffix if taken."""
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise UsageError(f'--output {output} is a file, not a directory; pass the directory for run directories') from e
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


@contextlib.contextmanager
def hold_run_dir(run_dir: os.PathLike, created: bool) -> Iterator[Path]:
    """Hold the run directory for one training process while the body trains in it.

    A second process (a ``train`` with the same ``--output`` and ``--name``, or a ``--resume``) is refused with a
    `UsageError` while this one holds it. The lock is an ``fcntl.flock`` on ``train.lock``, which the system releases
    when the process dies, so a killed run's lock is taken over (with a note); the pid inside says who holds it.
    Where ``fcntl`` is missing (Windows) the lock file's existence is the lock and a dead pid's file is taken over.

    Temporary files that a killed process left (`atomic_path` removes its own otherwise) are removed once the lock
    is held: no other process writes here then. When the body fails, a directory this process ``created`` that
    holds no checkpoint yet is removed; an interrupt (Ctrl-C) gets a note saying how to resume.
    """
    run_dir = Path(run_dir)
    with _run_lock(run_dir):
        for tmp in run_dir.glob('.*.tmp'):
            tmp.unlink(missing_ok=True)
        try:
            yield run_dir
        except BaseException as e:
            has_checkpoint = (run_dir / f'last{STATE_SUFFIX}').is_file()
            if created and not has_checkpoint:
                shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                removed = f' ({run_dir} removed)' if created else ''
                e.add_note(
                    f'continue it with boatvit train --resume {run_dir}'
                    if has_checkpoint
                    else f'no epoch had finished, so nothing was saved{removed}'
                )
            raise


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    path = run_dir / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if fcntl else _create_lock(path)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(_busy(run_dir, _lock_pid(path))) from None
            stale = _lock_pid(path)
            if stale:  # its holder died without releasing it (killed): the system released the flock
                print(f'note: taking over {path} from process {stale}, which is no longer running', file=sys.stderr)
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        yield
    finally:
        # emptied, not removed: removing it would let a process that opened it just before lock a deleted file
        os.ftruncate(fd, 0)
        os.close(fd)
        if fcntl is None:
            os.unlink(path)


def _create_lock(path: Path) -> int:
    """The lock file created exclusively, taking over one whose process is gone (no ``fcntl``)."""
    for _ in range(2):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = _lock_pid(path)
            if pid and _alive(pid):
                raise UsageError(_busy(path.parent, pid)) from None
            print(f'note: taking over {path} from process {pid}, which is no longer running', file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise UsageError(_busy(path.parent, _lock_pid(path)))


def _lock_pid(path: Path) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _busy(run_dir: Path, pid: Optional[int]) -> str:
    who = f'process {pid}' if pid else 'another process'
    return (
        f'{run_dir} is being trained by {who} ({run_dir / LOCK_FILE}); wait for it to finish or stop it, or train'
        ' into another --name'
    )
