"""ops.py reads the kernels' limits from the extension instead of restating them; without the
extension every limit is empty, so no shape is routed to a CUDA kernel."""

from __future__ import annotations

from persimmon_rt import ops


def test_limits_match_the_extension():
    if not ops.HAVE_CUDA_EXT:
        assert ops.CUDA_ARCHS == () and ops.ATTENTION_HEAD_DIMS == () and ops.DECODE_LINEAR_CONFIGS == ()
        assert ops.DECODE_LINEAR_MAX_ROWS == 0 and ops.LAYERNORM_MAX_HIDDEN == 0
        assert not ops.kernels_support(64)
        return
    assert ops.CUDA_ARCHS == tuple(ops._C.CUDA_ARCHS.split(","))
    assert ops.DECODE_LINEAR_MAX_ROWS == ops._C.DECODE_LINEAR_MAX_ROWS >= 1
    assert ops.ATTENTION_HEAD_DIMS == tuple(ops._C.ATTENTION_HEAD_DIMS)
    assert ops.LAYERNORM_MAX_HIDDEN == ops._C.LAYERNORM_MAX_HIDDEN
    assert ops.DECODE_LINEAR_CONFIGS == tuple(ops._C.DECODE_LINEAR_CONFIGS)
    # every configuration names its row limit ("m8 ...", "m16 ..."), and the largest is the op's limit
    assert max(int(n.split()[0][1:]) for n in ops.DECODE_LINEAR_CONFIGS) == ops.DECODE_LINEAR_MAX_ROWS
    assert all(ops.kernels_support(d) for d in ops.ATTENTION_HEAD_DIMS)
    assert not ops.kernels_support(max(ops.ATTENTION_HEAD_DIMS) + 8)


def test_limit_types():
    assert isinstance(ops.DECODE_LINEAR_MAX_ROWS, int) and isinstance(ops.LAYERNORM_MAX_HIDDEN, int)
    assert all(isinstance(d, int) for d in ops.ATTENTION_HEAD_DIMS)
    assert all(isinstance(a, str) for a in ops.CUDA_ARCHS)
