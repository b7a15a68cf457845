"""What the library runs on: device resolution, the process group torchrun describes, autocast, telling
out-of-memory errors, optional packages."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .errors import UsageError

__all__ = [
    'AMP_DTYPES',
    'CLI_EXTRA',
    'resolve_device',
    'init_distributed',
    'AMP_CHOICES',
    'AMP_HELP',
    'autocast',
    'fast_bf16',
    'check_amp',
    'resolve_amp',
    'precision_name',
    'out_of_memory',
    'require_extra',
]

#: ``--amp`` value -> autocast dtype; 'none' runs float32
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
#: what ``--amp`` takes: an autocast dtype, or 'auto' (`resolve_amp`)
AMP_CHOICES = ('auto', *AMP_DTYPES)
AMP_HELP = (
    "autocast dtype; 'auto' (the default): bf16 where bf16 matrix products are faster than float32 (a GPU, a CPU with"
    ' AMX), else none (float32)'
)
#: the extra that installs the optional packages of the command line (scikit-learn, matplotlib)
CLI_EXTRA = 'cli'


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU; a GPU that torch does not see is a `UsageError`."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device torch knows ({e}); pass 'auto', 'cpu' or 'cuda'") from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name} asks for a GPU but torch sees none; pass --device cpu')
    if device.type not in ('cpu', 'cuda') and not _available(device.type):
        raise UsageError(f'--device {name}: torch has no {device.type} device on this machine; pass --device cpu')
    return device


def _available(device_type: str) -> bool:
    # torch.mps, torch.xpu, ... each say whether their device is there
    backend = getattr(torch, device_type, None)
    return bool(getattr(backend, 'is_available', lambda: False)())


def init_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on the CPU); returns rank,
    world size and this process's device (its ``LOCAL_RANK`` GPU). One process, no torchrun: ``(0, 1, device)``."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device = resolve_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world_size, device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``amp`` in :data:`AMP_CHOICES` ('auto' as `resolve_amp` decides); 'none' runs float32."""
    dtype = AMP_DTYPES[resolve_amp(amp, device)[0]]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run faster than float32 on ``device``: every CUDA GPU boatvit supports, and CPUs
    with bf16 matrix units (Intel AMX).

    AVX512-BF16 alone does not count: it is a vector dot product, not a matrix unit, and torch's bf16 matmul on it is
    slower than its float32 one. Measured on an AMX Xeon with oneDNN held to AVX512-BF16
    (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``), one 512x512 product at one thread: float32 1.66 ms, bf16 2.65 ms
    (0.63x); with AMX, bf16 0.23 ms (7.2x).
    """
    if device.type == 'cuda':
        return True
    if device.type != 'cpu':
        return False
    # torch's own CPU feature probe; private, so a torch without it counts as a CPU without the units
    return bool(getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)())


def check_amp(amp: str) -> None:
    """Raise a `UsageError` naming the choices when ``amp`` is none of :data:`AMP_CHOICES`."""
    if amp not in AMP_CHOICES:
        raise UsageError(f'--amp must be one of {", ".join(AMP_CHOICES)}, got {amp!r}')


def resolve_amp(amp: str, device: torch.device) -> Tuple[str, Optional[str]]:
    """The autocast dtype of :data:`AMP_DTYPES` that ``amp`` means on ``device``, and a line saying why when 'auto'
    chose bf16 (None otherwise).

    'auto' is 'bf16' where bf16 matrix products are faster than float32 (`fast_bf16`: a GPU, a CPU with AMX), else
    'none' (float32, said nothing of: the usual precision); 'none', 'bf16' and 'fp16' are kept.

    Raises:
        UsageError: ``amp`` is none of :data:`AMP_CHOICES`.
    """
    check_amp(amp)
    if amp != 'auto':
        return amp, None
    if not fast_bf16(device):
        return 'none', None
    if device.type == 'cpu':
        units = 'this CPU has bf16 matrix units (AMX)'
    else:
        units = 'this GPU multiplies bf16 matrices faster than float32'
    return 'bf16', f'bf16 autocast: {units}; --amp none to run float32'


def precision_name(amp: str) -> str:
    """How a run's output names the precision of an :data:`AMP_DTYPES` value: 'float32' or e.g. 'bf16 autocast'."""
    return 'float32' if amp == 'none' else f'{amp} autocast'


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA raises OutOfMemoryError, the CPU allocator a RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def require_extra(module: str, package: str, needed_for: str, extra: str = CLI_EXTRA) -> None:
    """Raise a `UsageError` naming ``pip install 'boatvit[<extra>]'`` when the optional ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{needed_for} needs {package}, which is not installed; pip install 'boatvit[{extra}]'")
