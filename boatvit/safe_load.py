"""Read checkpoint files without running code from them: safetensors, and ``torch.save`` pickles through a
restricted unpickler.

The BOAT-Swin training checkpoint pickles a yacs ``CfgNode``, which ``torch.load(weights_only=True)`` refuses even
when the class is allow-listed, and yacs need not be installed. So a torch file
is read with ``weights_only=True`` when a static scan of its pickle finds nothing but what that loader accepts
(plus ``argparse.Namespace``, the BOAT-CSWin ``args``), and otherwise with :class:`RestrictedUnpickler`, which:

* resolves only :data:`ALLOWED_GLOBALS`: tensor rebuilding, dtypes, ``OrderedDict``, ``argparse.Namespace``, ...;
* turns every other class into an inert :class:`StubObject` that keeps the pickled data (a ``CfgNode`` becomes a
  dict-like stub whose items are the config), without importing its module;
* refuses the file when the pickle *calls* anything outside the list, because calling is how a pickle runs code
  (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...).

A TorchScript archive (``torch.jit.save``) is refused before anything reads it: ``torch.load`` hands such a file
to ``torch.jit.load``, which runs the archive's own code (its ``__setstate__`` methods).

See SECURITY.md for what is accepted and refused.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import os
import pickle
import types
from pathlib import Path
from typing import Any, BinaryIO, Dict, NoReturn, Tuple, Union

import torch
import zipfile
from safetensors import safe_open

from .errors import CheckpointFileError, UnsafeCheckpointError

__all__ = [
    'ALLOWED_GLOBALS',
    'CheckpointFileError',
    'UnsafeCheckpointError',
    'StubObject',
    'RestrictedUnpickler',
    'load_checkpoint_file',
    'read_checkpoint_file',
    'file_kind',
]

PathLike = Union[str, os.PathLike]


def _allowed_globals() -> Dict[str, Any]:
    allowed = {
        'collections.OrderedDict': collections.OrderedDict,
        'argparse.Namespace': argparse.Namespace,
        'torch.Size': torch.Size,
        'torch.device': torch.device,
        'torch.nn.parameter.Parameter': torch.nn.Parameter,
        # protocol-2 pickles of bytes, sets and complex numbers call these
        '_codecs.encode': codecs.encode,
        'builtins.set': set,
        'builtins.frozenset': frozenset,
        'builtins.complex': complex,
        'builtins.bytearray': bytearray,
        'builtins.slice': slice,
    }
    for name in (
        '_rebuild_tensor',
        '_rebuild_tensor_v2',
        '_rebuild_tensor_v3',
        '_rebuild_parameter',
        '_rebuild_parameter_with_state',
    ):
        allowed[f'torch._utils.{name}'] = getattr(torch._utils, name)
    for dtype in vars(torch).values():
        if isinstance(dtype, torch.dtype):
            allowed[str(dtype)] = dtype  # str(torch.float32) == 'torch.float32'
    return allowed


#: ``'module.name'`` -> object: the only globals a restricted load resolves (storages are resolved by torch itself).
ALLOWED_GLOBALS: Dict[str, Any] = _allowed_globals()


class _StubType(type):
    """Metaclass of stub classes: creating an instance through ``__new__`` (how a pickle restores an object) is
    fine, calling the class (how a pickle calls a function, or a class with custom ``__reduce__``) is refused."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise UnsafeCheckpointError(
            f'the pickle calls {cls.stub_of}() while loading, and {cls.stub_of} is not on the allow-list; a pickle '
            'that calls code can run anything, so the file is refused'
        )


class StubObject(dict, metaclass=_StubType):
    """An object of a class the restricted loader does not import: its pickled data, inert.

    Dict items are the object's own items when the class was a dict subclass (yacs ``CfgNode``: the config).

    Attributes:
        stub_of: ``'module.QualName'`` of the original class (on the class).
        new_args: the arguments the pickle passed to ``__new__``.
        state: what the pickle passed to ``__setstate__`` (usually the instance ``__dict__``), or None.
        list_items: items appended to it (when the class was a list subclass).
    """

    stub_of = 'StubObject'

    def __new__(cls, *args: Any, **kwargs: Any) -> 'StubObject':
        obj = super().__new__(cls)
        obj.new_args = args + ((kwargs,) if kwargs else ())
        obj.state = None
        obj.list_items = []
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.list_items.append(item)

    def extend(self, items: Any) -> None:
        self.list_items.extend(items)

    def __repr__(self) -> str:
        return f'<stub {self.stub_of} {dict.__repr__(self)} state={self.state!r}>'


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and stubs every other global (see module docstring).

    No module outside the allow-list is imported and no stubbed global is ever called.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stubs: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) name the builtins module by its Python 2 name
        key = f'{"builtins" if module == "__builtin__" else module}.{name}'
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        if key not in self._stubs:
            class_name = name.rsplit('.', 1)[-1]
            self._stubs[key] = _StubType(class_name, (StubObject,), {'__module__': module, 'stub_of': key})
        return self._stubs[key]


# what torch.load needs of a ``pickle_module``
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__='boatvit.safe_load.restricted_pickle',
    Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load(),
)


def file_kind(path: Path) -> str:
    """``'safetensors'``, ``'torch-zip'`` (torch >= 1.6) or ``'torch-legacy'`` from the first bytes of the file."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f'{path}: the file is empty; the download or copy did not finish.')
    with path.open('rb') as f:
        head = f.read(9)
    if head.startswith(b'PK\x03\x04'):
        return 'torch-zip'
    # safetensors: a little-endian u64 header size, then the JSON header. Tested before the pickle opcode since the
    # size's first byte can be 0x80; a legacy torch file never has '{' at byte 8 (it is inside its magic number)
    if len(head) == 9 and head[8:9] == b'{':
        return 'safetensors'
    if head[:1] == b'\x80':  # pickle PROTO opcode: the pre-1.6 torch.save format starts with a pickled magic number
        return 'torch-legacy'
    if path.suffix == '.safetensors':
        return 'safetensors'
    raise CheckpointFileError(
        f'{path}: not a checkpoint: neither a PyTorch file (torch.save) nor a safetensors file (it starts with '
        f'{head[:8]!r}). Pass a released .pth / .pth.tar file or a file written by `boatvit convert`.'
    )


def _check_path(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'expected a checkpoint path (str or os.PathLike), got {type(path).__name__}.')
    path = Path(path)
    if not path.exists():
        raise CheckpointFileError(f'{path}: no such file.')
    if not path.is_file():
        raise CheckpointFileError(f'{path}: not a file; pass the checkpoint file itself, not a directory.')
    return path


def _refuse_torchscript(path: Path, f: BinaryIO) -> None:
    """Raise `UnsafeCheckpointError` when the open zip file ``f`` is a TorchScript archive.

    Both readers are asked, Python's and the one torch.load uses, so a zip crafted to look different to each is
    still caught. Nothing in the archive is read beyond its table of contents.
    """
    try:
        names = [n.split('/', 1)[-1] for n in zipfile.ZipFile(f).namelist()]
        f.seek(0)
        names += list(torch._C.PyTorchFileReader(f).get_all_records())
    except Exception as e:  # a damaged zip: say so here, where the reason is known
        raise CheckpointFileError(
            f'{path}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {e}). The file is truncated or '
            'corrupt; download or copy it again.'
        ) from e
    finally:
        f.seek(0)
    # torch.jit.save writes the archive's code and constants beside data.pkl; torch.load tells an archive by
    # constants.pkl, and a file with code/ but without it is no checkpoint either
    if any(n == 'constants.pkl' or n.startswith('code/') for n in names):
        raise UnsafeCheckpointError(
            f'{path}: refused: this is a TorchScript archive (torch.jit.save), not a checkpoint. Loading it runs the '
            'code stored in it, so boatvit never does; save model.state_dict() with torch.save or safetensors '
            'instead.'
        )


def _weights_only_suffices(f: BinaryIO, kind: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` accepts the file, from a static scan of its pickle (no tensor is
    loaded). Only a shortcut: a pickle the scan cannot read (protocol < 2, damaged) goes to the restricted
    unpickler, which reports real damage."""
    if kind != 'torch-zip':
        return False
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:
        return False
    finally:
        f.seek(0)
    return not unsafe - {'argparse.Namespace'}


def _load_torch(f: BinaryIO, kind: str) -> Any:
    if _weights_only_suffices(f, kind):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(f, map_location='cpu', weights_only=True)
    # never a TorchScript archive here (refused before), so torch.load only unpickles, with the restricted unpickler
    return torch.load(f, map_location='cpu', weights_only=False, pickle_module=_RESTRICTED_PICKLE)


def _load_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    with safe_open(str(path), framework='pt', device='cpu') as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_checkpoint_file(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read a checkpoint file, and a safetensors file's metadata, without executing code from it.

    Args:
        path: a ``torch.save`` file (either BOAT training checkpoint, a bare state dict, ...) or a safetensors file.
            The format is told from the file's first bytes, not its name.

    Returns:
        ``(checkpoint, metadata)``: the checkpoint dict (tensors on the CPU), for safetensors the flat dict of tensors
        (objects of classes outside the allow-list come back as :class:`StubObject`); the safetensors header's
        string metadata as stored, unvalidated (`boatvit.weights` validates it), {} for a torch file.

    Raises:
        CheckpointFileError: the file is missing, empty, not a checkpoint, truncated or corrupt, or holds no dict.
        UnsafeCheckpointError: the pickle would call code outside the allow-list, or the file is a TorchScript
            archive.
    """
    path = _check_path(path)
    kind = file_kind(path)
    # one open file for the checks and the load, so the file checked is the file loaded
    with path.open('rb') as f:
        if kind == 'torch-zip':
            _refuse_torchscript(path, f)
        try:
            checkpoint, metadata = _load_safetensors(path) if kind == 'safetensors' else (_load_torch(f, kind), {})
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(
                f'{path}: refused: {e}. boatvit reads tensors, containers and plain values only (see SECURITY.md); '
                'if you trust the file, load it yourself with torch.load(path, weights_only=False) and pass the '
                'dict to boatvit.load_reference_weights.'
            ) from None
        except Exception as e:  # torch and safetensors raise many types for damaged files; all mean the same here
            raise CheckpointFileError(
                f'{path}: cannot read it as a {"safetensors" if kind == "safetensors" else "PyTorch"} checkpoint '
                f'({type(e).__name__}: {e}). The file is truncated or corrupt; download or copy it again.'
            ) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointFileError(
            f'{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict. A whole pickled '
            'model is not supported: save model.state_dict() instead.'
        )
    return checkpoint, metadata


def load_checkpoint_file(path: PathLike) -> Dict[str, Any]:
    """The checkpoint dict of :func:`read_checkpoint_file` (for callers that need no metadata)."""
    return read_checkpoint_file(path)[0]
