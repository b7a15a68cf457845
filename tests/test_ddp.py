"""Both families under DistributedDataParallel in two gloo processes: no per-step bucket-stride warning (the LePE
convs of FSLA and of the CSWin stripes are fed channels-last views), and the replicas stay equal."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reduced_models import reduced


def _worker(rank: int, world_size: int, family: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = torch.nn.parallel.DistributedDataParallel(reduced(family, img_size=64).train())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            for _ in range(2):
                model(images).logsumexp(-1).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        messages = [str(w.message) for w in caught if 'stride' in str(w.message).lower()]
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({'warnings': messages, 'params': flat}, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_two_process_ddp_has_no_bucket_stride_warning(family, tmp_path):
    out = str(tmp_path / 'result')
    mp.spawn(_worker, args=(2, family, _free_port(), out), nprocs=2, join=True)
    results = [torch.load(f'{out}.{rank}') for rank in range(2)]
    assert results[0]['warnings'] == [] and results[1]['warnings'] == []
    # gradients were averaged: both replicas took the same steps
    torch.testing.assert_close(results[0]['params'], results[1]['params'], rtol=0, atol=0)
