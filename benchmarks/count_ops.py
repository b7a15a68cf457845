"""How many ATen ops (on a GPU: kernel launches) one FSLA layer and one whole model issue, and whether any of them
reads a device value on the host or copies host data to the device.

Ops are counted below autograd by a ``TorchDispatchMode``; views (ops whose result aliases an input: ``view``,
``transpose``, ``unfold``, ...) launch nothing and are left out. The second call of each step is counted, so that the
index tensors the layers cache per device are already there. ``--device meta`` takes the route of an accelerator
(the clustering as PyTorch ops, the cluster attention through ``F.scaled_dot_product_attention``) without data: what
a CUDA device would launch, less what SDPA fuses there (on the meta device each SDPA call runs as its math ops,
which are counted; ``sdpa_calls`` says how many calls there were). ``--device cpu`` is the CPU route, where the
clustering is one op (the compiled kernel).

A host read is an op that waits for the device to hand a value to Python or to size its output (``.item()``,
``nonzero``, indexing by a boolean mask, ...): each one stalls the CUDA stream. A host copy is an op that takes a CPU
tensor to the device, or mixes the two.

    python -m benchmarks.count_ops                     # meta (the accelerator route), batch 8
    python -m benchmarks.count_ops --device cpu
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.bench_fsla import SHAPES
from benchmarks.bench_models import BOAT_CSWIN, BOAT_SWIN, CSWIN_NO_FSLA, SWIN
from benchmarks.common import build_model, environment, positive_int, print_table, write_json
from boatvit import FeatureSpaceAttention

# ops that make the host wait for a device value
HOST_READS = frozenset(
    {'_local_scalar_dense', 'nonzero', 'nonzero_static', 'masked_select', 'equal', 'is_nonzero', '_unique2',
     'unique_dim', 'unique_consecutive', 'repeat_interleave', 'bincount', 'histc'}
)  # fmt: skip
MASK_INDEXING = frozenset({'index', 'index_put', 'index_put_', '_index_put_impl_'})
# one per scaled_dot_product_attention call: its math route's softmax (meta) or the CPU flash kernel
SDPA_CALL = frozenset({'_safe_softmax', '_scaled_dot_product_flash_attention_for_cpu'})

MODELS = (SWIN, BOAT_SWIN, CSWIN_NO_FSLA, BOAT_CSWIN)


def _is_view(func: torch._ops.OpOverload) -> bool:
    # _unsafe_view is a view whose schema does not say so (reshape's copy is counted as its clone)
    if func.overloadpacket.__name__ == '_unsafe_view':
        return True
    return any(ret.alias_info is not None and not ret.alias_info.is_write for ret in func._schema.returns)


class OpCounter(TorchDispatchMode):
    """Counts the non-view ATen ops run under it by name, and lists host reads and host copies (see the module
    docstring) in ``host_reads`` and ``host_copies``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.host_reads: List[str] = []
        self.host_copies: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not _is_view(func):
            self.ops[name] += 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # indexing by a boolean mask finds the mask's True entries (nonzero) inside the op
        if name in HOST_READS or (name in MASK_INDEXING and any(t.dtype == torch.bool for t in tensors[1:])):
            self.host_reads.append(name)
        devices = {t.device.type for t in tensors}
        target = kwargs.get('device')
        if len(devices) > 1 or (devices == {'cpu'} and target is not None and torch.device(target).type != 'cpu'):
            self.host_copies.append(name)
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def summary(self) -> Dict[str, Any]:
        return {
            'ops': self.total,
            'sdpa_calls': sum(n for name, n in self.ops.items() if name in SDPA_CALL),
            'host_reads': self.host_reads,
            'host_copies': self.host_copies,
            'by_op': dict(self.ops.most_common()),
        }


def count(step: Callable[[], Any]) -> Dict[str, Any]:
    """The ops of ``step()``'s second call (the first fills the per-device caches)."""
    step()
    with OpCounter() as counter:
        step()
    return counter.summary()


def _steps(module: torch.nn.Module, inputs: tuple) -> Dict[str, Callable[[], Any]]:
    """Inference (``no_grad``, eval) and a training forward and backward of ``module(*inputs)``."""

    def inference():
        module.eval()
        with torch.no_grad():
            module(*inputs)

    def train():
        module.train()
        out = module(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return {'inference': inference, 'train': train}


def fsla_counts(shape: tuple, batch: int, device: str) -> Dict[str, Dict[str, Any]]:
    """Per mode, the ops of one ``FeatureSpaceAttention`` call at one of ``bench_fsla.SHAPES``."""
    _, side, dim, heads, scale, _ = shape
    torch.manual_seed(0)
    layer = FeatureSpaceAttention(dim, heads, scale=scale, device=device)
    tokens = torch.randn(batch, side * side, dim, device=device, requires_grad=True)
    return {mode: count(step) for mode, step in _steps(layer, (tokens, (side, side))).items()}


def model_counts(spec: str, batch: int, size: int, device: str) -> Dict[str, Dict[str, Any]]:
    """Per mode, the ops of one whole-model call (``spec`` as ``benchmarks.common.parse_spec`` reads it)."""
    model = build_model(spec, device)
    images = torch.randn(batch, 3, size, size, device=device)
    return {mode: count(step) for mode, step in _steps(model, (images,)).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--device',
        default='meta',
        choices=('meta', 'cpu'),
        help="meta: the route of an accelerator, no data (default); cpu: the CPU route with boatvit's CPU kernels",
    )
    parser.add_argument('--batch', type=positive_int, default=8)
    parser.add_argument('--shapes', default=','.join(SHAPES), help=f'comma-separated subset of {list(SHAPES)}')
    parser.add_argument('--models', default=','.join(MODELS), help=f'comma-separated subset of {list(MODELS)}')
    parser.add_argument('--img-size', type=positive_int, default=224)
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    args = parser.parse_args(argv)
    for option, chosen, known in (('--shapes', args.shapes, SHAPES), ('--models', args.models, MODELS)):
        unknown = [k for k in filter(None, chosen.split(',')) if k not in known]
        if unknown:
            parser.error(f'{option}: unknown {unknown}; choose from {list(known)}')
    args.repeats = args.warmup = None  # counted once, not timed

    results: Dict[str, Any] = {'environment': environment(args), 'batch': args.batch, 'fsla': {}, 'models': {}}
    rows = []
    for name in filter(None, args.shapes.split(',')):
        results['fsla'][name] = fsla_counts(SHAPES[name], args.batch, args.device)
        rows += [{'what': f'FSLA {name}', 'mode': m, **_row(c)} for m, c in results['fsla'][name].items()]
    for name in filter(None, args.models.split(',')):
        results['models'][name] = model_counts(name, args.batch, args.img_size, args.device)
        rows += [{'what': name, 'mode': m, **_row(c)} for m, c in results['models'][name].items()]
    print_table(
        f'ATen ops per call ({args.device}, batch {args.batch}; views left out)',
        rows,
        ['what', 'mode', 'ops', 'sdpa_calls', 'host_reads', 'host_copies'],
    )
    write_json(args, 'count_ops', results)


def _row(counts: Dict[str, Any]) -> Dict[str, Any]:
    return {
        'ops': counts['ops'],
        'sdpa_calls': counts['sdpa_calls'],
        'host_reads': len(counts['host_reads']),
        'host_copies': len(counts['host_copies']),
    }


if __name__ == '__main__':
    main()
