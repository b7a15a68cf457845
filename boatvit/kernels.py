"""boatvit's compiled CPU kernels: the fused balanced hierarchical clustering of ``csrc/clustering_cpu.cpp``,
FSLA's fused attention inside clusters with its backward, ``csrc/cluster_attention_cpu.cpp``, and its LePE term added
in inference, ``csrc/lepe_cpu.cpp``.

They are built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; once, then loaded from the
build cache) into one library, registered as ``torch.ops.boatvit.clustered_order``,
``torch.ops.boatvit.cluster_attention``, ``torch.ops.boatvit.cluster_attention_backward`` and
``torch.ops.boatvit.add_lepe``. Where they cannot be
built, the PyTorch ops (the same computation) run instead, after one warning that names the reason.

The ``backend`` argument of the clustering and of FSLA chooses: ``'auto'`` (the kernels where they apply, falling
back with a warning if they cannot be built), ``'kernel'`` (required: an error if they cannot be built, or if the
clustering kernel does not apply) or ``'torch'`` (the PyTorch ops). ``None`` takes the default from
``BOATVIT_CPU_KERNEL``: ``auto`` (unset), ``on`` (``'kernel'``) or ``off`` (``'torch'``).
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
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

__all__ = ['CPUKernels', 'cpu_kernels', 'resolve_backend', 'use_cpu_kernel', 'BACKENDS', 'KERNEL_ENV']

KERNEL_ENV = 'BOATVIT_CPU_KERNEL'
BACKENDS = ('auto', 'kernel', 'torch')
# the environment variable's values, and the backend each one makes the default
_ENV_BACKENDS = {'auto': 'auto', 'on': 'kernel', 'off': 'torch'}
_SOURCES = [
    Path(__file__).parent / 'csrc' / name
    for name in ('clustering_cpu.cpp', 'cluster_attention_cpu.cpp', 'lepe_cpu.cpp')
]


class CPUKernels(NamedTuple):
    """The compiled operators (``torch.ops.boatvit.*``)."""

    clustered_order: Callable
    cluster_attention: Callable
    cluster_attention_backward: Callable
    add_lepe: Callable
    #: ``(dtype, head_dim) -> bool``: whether bf16/fp16 attention runs on the CPU's matrix units (Intel AMX)
    cluster_attention_matrix_units: Callable = lambda dtype, head_dim: False


_lock = threading.Lock()
_loaded: Optional[CPUKernels] = None
_failure: Optional[str] = None


def resolve_backend(backend: Optional[str]) -> str:
    """The backend to run (the clustering's and the cluster attention's), one of :data:`BACKENDS`: ``backend`` itself,
    or for None the default that ``BOATVIT_CPU_KERNEL`` sets (``auto``, ``on`` or ``off``; unset is ``auto``)."""
    if backend is None:
        setting = os.environ.get(KERNEL_ENV, 'auto')
        if setting.strip().lower() not in _ENV_BACKENDS:
            raise ValueError(
                f'{KERNEL_ENV}={setting!r} is not one of {tuple(_ENV_BACKENDS)}: unset it or set it to '
                f"'off' to use the PyTorch ops, 'on' to require the compiled kernels."
            )
        return _ENV_BACKENDS[setting.strip().lower()]
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS} or None (the default from {KERNEL_ENV}), got {backend!r}.')
    return backend


def _build_flags() -> Tuple[List[str], str]:
    # vector width is chosen for the CPU that builds it; its name is part of the build's, so a cache shared by
    # machines of another kind (a cluster's home directory) builds a second copy instead of loading this one
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is a header template that spreads the rows with OpenMP pragmas, which only a build
    # with OpenMP compiles; the runtime it links to is the libgomp torch has loaded already
    flags = ['-O3', '-fopenmp']
    if capability in ('AVX2', 'AVX512'):
        # CPU_CAPABILITY selects ATen's AVX2 vector types (at::vec) in the headers, as torch's own AVX2 build of its
        # kernels does; also on AVX512 machines, where 16-lane vectors fit a cluster's 69 keys worse (measured slower)
        # -mf16c: the vector float16 conversions of at::vec (every AVX2 CPU has F16C)
        flags += ['-mavx2', '-mfma', '-mf16c', '-DCPU_CAPABILITY=AVX2', '-DCPU_CAPABILITY_AVX2']
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


def _build() -> CPUKernels:
    flags, capability = _build_flags()
    # torch's build cache reuses a build whose sources, flags and include paths are unchanged, which they are after
    # torch is upgraded in place: its version in the name keeps a build against another torch's ABI from loading
    torch_version = re.sub(r'\W', '_', torch.__version__)
    name = f'boatvit_cpu_kernels_{capability}_torch{torch_version}'
    root = Path(os.environ.get('TORCH_EXTENSIONS_DIR', Path.home() / '.cache' / 'torch_extensions'))
    build_dir = root / name
    if not (build_dir / f'{name}.so').exists():
        print(f'boatvit: building its CPU kernels in {build_dir} (once)', file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_ninja_on_path():
        from torch.utils.cpp_extension import load  # imported late: it looks for CUDA at import

        load(
            name,
            [str(source) for source in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=['-fopenmp'],
            build_directory=str(build_dir),
            is_python_module=False,
        )
    ops = torch.ops.boatvit
    return CPUKernels(
        ops.clustered_order,
        ops.cluster_attention,
        ops.cluster_attention_backward,
        ops.add_lepe,
        ops.cluster_attention_matrix_units,
    )


def use_cpu_kernel(x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether ``backend`` (one of :data:`BACKENDS`, or None for the ``BOATVIT_CPU_KERNEL`` default) runs a compiled
    CPU kernel on ``x``, where the operation has one.

    ``'auto'`` takes it for CPU tensors in eager mode and in ``torch.compile`` graphs (where the operators' fake
    implementations stand in for them), and keeps the PyTorch ops for tensor subclasses outside compilation, for
    ``torch.export``, TorchScript traces (FLOP counters read their matmuls) and ONNX, which every consumer
    understands. ``'kernel'`` takes it wherever the operator can run, and refuses the rest by name.
    """
    backend = resolve_backend(backend)
    if backend == 'torch':
        return False
    if backend == 'kernel':
        if x.device.type != 'cpu' or torch.onnx.is_in_onnx_export():
            where = 'an ONNX export' if x.device.type == 'cpu' else f'a {x.device.type} tensor'
            raise ValueError(
                f"the backend 'kernel' runs on CPU tensors only and cannot be exported to ONNX, got {where}: pass "
                f"backend='auto' or 'torch'."
            )
        return True
    traced = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
    return x.device.type == 'cpu' and not traced and (torch.compiler.is_compiling() or type(x) is torch.Tensor)


def cpu_kernels(required: bool = False) -> Optional[CPUKernels]:
    """The compiled operators, built or loaded on the first call; when they cannot be built, None after one warning
    with the reason, or a RuntimeError if ``required``.

    ``clustered_order`` takes ``(q (B, heads, N, d) float64/float32/bfloat16/float16 CPU with unit stride over d
    (half precision is clustered in float32), n_pad, levels,
    iterations, temperature)``, ``n_pad`` and ``levels`` those of ``cluster_layout(N, cluster_size)``, and returns the
    padded clustered order ``(B, heads, n_pad)``, like ``balanced_hierarchical_clustering(..., return_padded=True)``.

    ``cluster_attention`` takes ``(qkv (B, N, 3, heads, d) float64/float32/bfloat16/float16 contiguous (half precision
    accumulates and normalises in float32, its products on the CPU's matrix units where
    ``cluster_attention_matrix_units(dtype, d)``), order (B, heads, n_pad) int64
    contiguous, cluster_size, num_clusters, overlap, scale)``, the padded order and its layout's cluster size and
    count, and returns FSLA's attention output ``(B, N, heads * d)`` in token order (see
    ``boatvit.fsla._attend_in_clusters``, its oracle); ``cluster_attention_backward`` takes the output's gradient
    ``(B, N, heads * d)`` contiguous, then the same arguments, and returns the gradient of ``qkv``. The order must
    hold every token once per (image, head): a token it leaves out gets no output row and no gradient row.

    ``add_lepe`` takes ``(out (B, N, heads * d), qkv (B, N, 3, heads, d))``, both contiguous and of one dtype, the
    LePE's depthwise conv ``weight (heads * d, 1, 3, 3)`` and ``bias (heads * d)`` or None, and the grid's ``H, W``,
    and returns ``out`` plus the conv (zero padding 1) of V laid out as an ``H x W`` NHWC image, summed in float32
    (float64 for float64) and rounded once; no gradient (see ``boatvit.fsla._fused_lepe``).
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
                            f'boatvit could not build its CPU kernels ({_failure}); the PyTorch ops run instead (the '
                            f'same clustering and attention, slower). Install a C++ compiler with OpenMP and ninja, '
                            f'point TORCH_EXTENSIONS_DIR to a writable directory, or pass '
                            f"backend='torch' (or set {KERNEL_ENV}=off) to silence this.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
    if _loaded is None and required:
        raise RuntimeError(
            f"the backend 'kernel' (or {KERNEL_ENV}=on) was required but boatvit's CPU kernels could not be "
            f"built: {_failure}. Pass backend='auto' or 'torch' to run the PyTorch ops."
        )
    return _loaded
