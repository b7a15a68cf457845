"""Peak memory of one model's inference forward or training step, measured alone in this (fresh) process.

Run by ``bench_models`` through ``common.run_in_fresh_process``; prints one JSON line. On CPU the figure is the
resident set size: its peak during the measured call (``VmHWM``, reset just before) minus its size with the model
built, the input made and, for training, one step already taken (so the optimizer state exists and is not counted as
a peak). On CUDA it is ``torch.cuda.max_memory_allocated`` over the same call, minus what was allocated before it.

    python -m benchmarks.peak_memory --model boat_swin_tiny_224 --mode train --batch 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import amp_dtype, build_model, make_step, positive_int, resident_kib, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, help="timm name, optionally ':key=value,...' kwargs")
    parser.add_argument('--mode', choices=('inference', 'train'), required=True)
    parser.add_argument('--batch', type=positive_int, required=True)
    parser.add_argument('--img-size', type=positive_int, default=224)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--threads', type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.model, args.device)
    step = make_step(model, args.mode, args.batch, args.img_size, args.device, amp_dtype(args))
    step()  # first call: optimizer state, allocator and kernel caches
    sync(args.device)
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(args.device)
        peak, base = torch.cuda.max_memory_allocated(), before
    else:
        base = resident_kib()['VmRSS'] * 1024
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS
        step()
        peak = resident_kib()['VmHWM'] * 1024
    print(
        json.dumps(
            {
                'model': args.model,
                'mode': args.mode,
                'base_mib': base / 2**20,
                'peak_mib': peak / 2**20,
                'peak_above_base_mib': (peak - base) / 2**20,
            }
        )
    )


if __name__ == '__main__':
    main()
