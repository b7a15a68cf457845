"""``benchmarks.bench_onnx.profile_by_op`` on a real ONNX Runtime profile: per op type and per node, the first run
left out, times per run."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.bench_onnx import _session, profile_by_op


def _graph(path: Path) -> None:
    """x (4, 256) -> MatMul -> TopK over the whole row (K = 256) -> Gather of the sorted indices' values."""
    w = helper.make_tensor('w', TensorProto.FLOAT, (256, 256), np.random.default_rng(0).standard_normal(256 * 256))
    k = helper.make_tensor('k', TensorProto.INT64, (1,), [256])
    nodes = [
        helper.make_node('MatMul', ['x', 'w'], ['y'], name='project'),
        helper.make_node('TopK', ['y', 'k'], ['values', 'indices'], name='sort_rows', axis=-1),
        helper.make_node('GatherElements', ['y', 'indices'], ['out'], name='gather_sorted', axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, (4, 256))],
        [helper.make_tensor_value_info('out', TensorProto.FLOAT, (4, 256))],
        initializer=[w, k],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), path)


def test_profile_by_op_counts_every_node_of_every_run_but_the_first(tmp_path):
    _graph(tmp_path / 'g.onnx')
    session = _session(tmp_path / 'g.onnx', threads=1, profile_prefix=str(tmp_path / 'p'))
    x = np.ones((4, 256), np.float32)
    for _ in range(4):
        session.run(None, {'x': x})
    trace = json.loads(Path(session.end_profiling()).read_text())
    result = profile_by_op(trace, top=10)
    assert result['runs'] == 3
    ops = {row['op_type']: row for row in result['op_types']}
    assert set(ops) == {'MatMul', 'TopK', 'GatherElements'}
    assert all(row['nodes'] == 1 and row['ms'] > 0 for row in ops.values())
    assert sum(row['share'] for row in ops.values()) == pytest.approx(1.0)
    assert result['kernel_ms_per_run'] == pytest.approx(sum(row['ms'] for row in ops.values()))
    assert {row['node'] for row in result['nodes']} == {'project', 'sort_rows', 'gather_sorted'}
    # top limits both tables
    assert len(profile_by_op(trace, top=1)['op_types']) == 1


def test_profile_of_a_single_run_is_refused():
    trace = [{'name': 'model_run', 'cat': 'Session', 'ts': 0, 'dur': 5}]
    with pytest.raises(ValueError, match='run the session at least twice'):
        profile_by_op(trace, top=5)
