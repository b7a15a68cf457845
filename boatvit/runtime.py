"""What the library runs on: device resolution, the process group torchrun describes, autocast, telling
out-of-memory errors, optional packages."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Tuple

import torch
import torch.distributed as dist

from .errors import UsageError

__all__ = [
    'AMP_DTYPES',
    'CLI_EXTRA',
    'resolve_device',
    'init_distributed',
    'autocast',
    'fast_bf16',
    'out_of_memory',
    'require_extra',
]

#: ``--amp`` value -> autocast dtype; 'none' runs float32
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
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
    """Mixed precision for ``amp`` in :data:`AMP_DTYPES`; 'none' runs float32."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run faster than float32 on ``device``: every CUDA GPU boatvit supports, and CPUs
    with bf16 matrix units (Intel AMX, or AVX512-BF16 on Intel and AMD)."""
    if device.type == 'cuda':
        return True
    if device.type != 'cpu':
        return False
    # torch's own CPU feature probes; private, so a torch without them counts as a CPU without the units
    probes = ('_is_amx_tile_supported', '_is_avx512_bf16_supported')
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA raises OutOfMemoryError, the CPU allocator a RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def require_extra(module: str, package: str, needed_for: str, extra: str = CLI_EXTRA) -> None:
    """Raise a `UsageError` naming ``pip install 'boatvit[<extra>]'`` when the optional ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{needed_for} needs {package}, which is not installed; pip install 'boatvit[{extra}]'")
