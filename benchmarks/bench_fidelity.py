"""Deployment fidelity on real images: does every route a trained model is run on give float32's top-1?

Trained weights (a run directory or weights file) on a labelled image folder's validation split, run five ways:
float32 eager (the reference), bf16 and fp16 autocast, ``torch.compile`` (float32), and ONNX Runtime (float32, the
file ``boatvit export`` writes). For each route: top-1 accuracy and the share of images whose top-1 class equals
float32 eager's; a route that moves top-1 is where to look with ``python -m benchmarks.bench_precision --weights``
(which layers' clusters move). Accuracy only, no timing::

    python -m benchmarks.bench_fidelity runs/cifar --data /data/cifar10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from benchmarks.common import environment, print_table, write_json
from boatvit.data import eval_transform, open_split
from boatvit.export import export_weights
from boatvit.weights import load_model, read_weights

ROUTES = ('float32', 'bf16 autocast', 'fp16 autocast', 'torch.compile', 'onnxruntime')


def route_functions(model: torch.nn.Module, weights: str, onnx_dir: Path) -> Dict[str, Callable]:
    """Batch of images -> logits (float32 numpy), per route."""

    def eager(dtype=None):
        def run(x):
            with torch.inference_mode(), torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
                return model(x).float().numpy()

        return run

    compiled = torch.compile(model, dynamic=True)

    def compiled_run(x):
        with torch.inference_mode():
            return compiled(x).numpy()

    import onnxruntime

    path = onnx_dir / 'model.onnx'
    export_weights(path, weights)  # a dynamic batch axis
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return {
        'float32': eager(),
        'bf16 autocast': eager(torch.bfloat16),
        'fp16 autocast': eager(torch.float16),
        'torch.compile': compiled_run,
        'onnxruntime': lambda x: session.run(None, {name: x.numpy()})[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('weights', help='run directory or weights file')
    parser.add_argument('--data', default=None, help='image folder root; default: the data the weights record')
    parser.add_argument('--split', default='val')
    parser.add_argument('--batch-size', type=int, default=250)
    parser.add_argument('--limit', type=int, default=None, help='at most this many images')
    parser.add_argument('--json', type=Path, default=None)
    args = parser.parse_args()
    source = read_weights(args.weights)
    loaded = load_model(source)
    model = loaded.model.eval()
    data = args.data or loaded.metadata.get('data')
    ds, _ = open_split(data, args.split)
    ds.transform = eval_transform(model, loaded.metadata)
    indices = range(len(ds) if args.limit is None else min(args.limit, len(ds)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        routes = route_functions(model, str(source.path), Path(tmp))
        top1 = {route: [] for route in ROUTES}
        labels = []
        for images, targets in loader:
            labels.append(targets.numpy())
            for route, run in routes.items():
                top1[route].append(run(images).argmax(-1))
    labels = np.concatenate(labels)
    top1 = {route: np.concatenate(v) for route, v in top1.items()}
    rows = [
        {
            'route': route,
            'top1_pct': 100 * float((top1[route] == labels).mean()),
            'same_top1_as_float32_pct': 100 * float((top1[route] == top1['float32']).mean()),
            'images_differing': int((top1[route] != top1['float32']).sum()),
        }
        for route in ROUTES
    ]
    print_table(
        f'{loaded.name} on {data} [{args.split}], {len(labels)} images',
        rows,
        ['route', 'top1_pct', 'same_top1_as_float32_pct', 'images_differing'],
    )
    args.device, args.compile, args.repeats, args.warmup, args.threads = 'cpu', False, 1, 0, torch.get_num_threads()
    write_json(args, 'bench_fidelity', {'environment': environment(args), 'weights': str(source.path), 'rows': rows})


if __name__ == '__main__':
    main()
