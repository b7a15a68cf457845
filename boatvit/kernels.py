"""boatvit's compiled CPU kernel: the fused balanced hierarchical clustering of ``csrc/clustering_cpu.cpp``.

It is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; once, then
loaded from the build cache) and registered as ``torch.ops.boatvit.clustered_order``. Where it cannot be built, the
eager PyTorch clustering (the same clustering) runs instead, after one warning that names the reason.

The clustering's ``backend`` argument chooses: ``'auto'`` (the kernel where it applies, falling back with a warning
if it cannot be built), ``'kernel'`` (required: an error if it cannot be built or does not apply) or ``'torch'``
(the PyTorch ops). ``None`` takes the default from ``BOATVIT_CPU_KERNEL``: ``auto`` (unset), ``on`` (``'kernel'``)
or ``off`` (``'torch'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ['clustering_kernel', 'resolve_backend', 'BACKENDS', 'KERNEL_ENV']

KERNEL_ENV = 'BOATVIT_CPU_KERNEL'
BACKENDS = ('auto', 'kernel', 'torch')
# the environment variable's values, and the backend each one makes the default
_ENV_BACKENDS = {'auto': 'auto', 'on': 'kernel', 'off': 'torch'}
_SOURCE = Path(__file__).parent / 'csrc' / 'clustering_cpu.cpp'

_lock = threading.Lock()
_loaded: Optional[Callable] = None
_failure: Optional[str] = None


def resolve_backend(backend: Optional[str]) -> str:
    """The clustering backend to run, one of :data:`BACKENDS`: ``backend`` itself, or for None the default that
    ``BOATVIT_CPU_KERNEL`` sets (``auto``, ``on`` or ``off``; unset is ``auto``)."""
    if backend is None:
        setting = os.environ.get(KERNEL_ENV, 'auto')
        if setting.strip().lower() not in _ENV_BACKENDS:
            raise ValueError(
                f'{KERNEL_ENV}={setting!r} is not one of {tuple(_ENV_BACKENDS)}: unset it or set it to '
                f"'off' to use the eager clustering, 'on' to require the compiled kernel."
            )
        return _ENV_BACKENDS[setting.strip().lower()]
    if backend not in BACKENDS:
        raise ValueError(
            f'clustering backend must be one of {BACKENDS} or None (the default from {KERNEL_ENV}), got {backend!r}.'
        )
    return backend


def _build_flags() -> Tuple[List[str], str]:
    # vector width is chosen for the CPU that builds it; its name is part of the build's, so a cache shared by
    # machines of another kind (a cluster's home directory) builds a second copy instead of loading this one
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is a header template that spreads the rows with OpenMP pragmas, which only a build
    # with OpenMP compiles; the runtime it links to is the libgomp torch has loaded already
    flags = ['-O3', '-fopenmp']
    if capability in ('AVX2', 'AVX512'):
        flags += ['-mavx2', '-mfma']
    return flags, capability.lower()


@contextlib.contextmanager
def _quiet_ninja_on_path():
    """The ``ninja`` the ``ninja`` package installed, on PATH while torch builds (also when the environment is not
    activated), and torch's note about a CUDA build of torch on a machine without CUDA silenced."""
    try:
        import ninja

        ninja_dir = ninja.BIN_DIR
    except ImportError:  # a ninja of the system's, if any, is found on PATH as it is
        ninja_dir = None
    path = os.environ.get('PATH', '')
    cpp_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_logger.level
    if ninja_dir:
        os.environ['PATH'] = os.pathsep.join([ninja_dir, path]) if path else ninja_dir
    cpp_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        os.environ['PATH'] = path
        cpp_logger.setLevel(level)


def _build() -> Callable:
    flags, capability = _build_flags()
    # torch's build cache reuses a build whose sources, flags and include paths are unchanged, which they are after
    # torch is upgraded in place: its version in the name keeps a build against another torch's ABI from loading
    torch_version = re.sub(r'\W', '_', torch.__version__)
    name = f'boatvit_clustering_{capability}_torch{torch_version}'
    root = Path(os.environ.get('TORCH_EXTENSIONS_DIR', Path.home() / '.cache' / 'torch_extensions'))
    build_dir = root / name
    if not (build_dir / f'{name}.so').exists():
        print(f'boatvit: building the CPU clustering kernel in {build_dir} (once)', file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_ninja_on_path():
        from torch.utils.cpp_extension import load  # imported late: it looks for CUDA at import

        load(
            name,
            [str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=['-fopenmp'],
            build_directory=str(build_dir),
            is_python_module=False,
        )
    return torch.ops.boatvit.clustered_order


def clustering_kernel(required: bool = False) -> Optional[Callable]:
    """``torch.ops.boatvit.clustered_order``, built or loaded on the first call; when it cannot be built, None after
    one warning with the reason, or a RuntimeError if ``required``.

    The op takes ``(q (B, heads, N, d) float32/float64 CPU with unit stride over d, n_pad, levels, iterations,
    temperature)``, ``n_pad`` and ``levels`` those of ``cluster_layout(N, cluster_size)``, and returns the padded
    clustered order ``(B, heads, n_pad)``, like ``balanced_hierarchical_clustering(..., return_padded=True)``.
    """
    global _loaded, _failure
    if _loaded is None and _failure is None:
        with _lock:
            if _loaded is None and _failure is None:
                try:
                    _loaded = _build()
                except Exception as error:  # a missing compiler or ninja, a failed build: all mean "run eager"
                    # a compiler's output can run to pages: its last lines name the error
                    _failure = f'{type(error).__name__}: ' + ' | '.join(str(error).strip().splitlines()[-3:])
                    if not required:
                        warnings.warn(
                            f'boatvit could not build its CPU clustering kernel ({_failure}); the eager PyTorch '
                            f'clustering runs instead (the same clustering, slower). Install a C++ compiler with '
                            f'OpenMP and ninja, point TORCH_EXTENSIONS_DIR to a writable directory, or pass '
                            f"backend='torch' (or set {KERNEL_ENV}=off) to silence this.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
    if _loaded is None and required:
        raise RuntimeError(
            f"the clustering backend 'kernel' (or {KERNEL_ENV}=on) was required but the CPU clustering "
            f"kernel could not be built: {_failure}. Pass backend='auto' or 'torch' to run the PyTorch "
            'ops.'
        )
    return _loaded
