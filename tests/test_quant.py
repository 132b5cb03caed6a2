import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quant import QuantScheme, dequantize, quantize


def _matmulnbits(x, q, n, k):
    ins = ["x", "B", "S"] + (["Z"] if q.zero_points is not None else [])
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "S")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=q.scheme.bits,
                            block_size=q.scheme.block_size, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    from edge.engine import session_options   # the process-wide thread pool every session must share
    return ort.InferenceSession(m.SerializeToString(), session_options(2),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,block", [(64, 32), (200, 32), (96, 64), (256, 128)])
@pytest.mark.parametrize("method", ["rtn", "mse", "gptq"])
def test_packing_matches_onnxruntime(bits, symmetric, k, block, method):
    """Our dequantize() is what onnxruntime computes with, including K not a multiple of the block."""
    rng = np.random.default_rng(k + bits)
    w = rng.standard_normal((48, k)).astype(np.float32)
    xs = rng.standard_normal((300, k)).astype(np.float32)
    q = quantize(w, QuantScheme(bits, block, symmetric, method), gram=xs.T @ xs if method == "gptq" else None,
                 rows_per_chunk=7)
    assert q.scheme.method == method
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(_matmulnbits(x, q, 48, k), x @ dequantize(q).T, rtol=1e-4, atol=1e-4)


def test_reported_error_is_the_real_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    for bits, bound in ((4, 0.12), (8, 0.008)):
        q = quantize(w, QuantScheme(bits, 32))
        real = np.linalg.norm(dequantize(q) - w) / np.linalg.norm(w)
        assert q.rms_rel_err == pytest.approx(real, rel=1e-5)
        assert q.rms_rel_err < bound
        assert 0 < q.max_rel_err < 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_never_loses_to_round_to_nearest(symmetric):
    w = (np.random.default_rng(1).standard_t(5, (96, 256)) * 0.02).astype(np.float32)
    for bits in (4, 8):
        rtn = quantize(w, QuantScheme(bits, 32, symmetric, "rtn"))
        mse = quantize(w, QuantScheme(bits, 32, symmetric, "mse"))
        assert mse.rms_rel_err <= rtn.rms_rel_err + 1e-7


def test_quant_policy_is_recorded_per_tensor(tiny_bundle):
    from edge.bundle import open_bundle
    b = tiny_bundle("qwen2_moe", "int4", quant_policy="attention=int8,down=int8,lm_head=fp32", method="mse")
    kinds = {t.name: (t.dtype, t.method) for t in open_bundle(b).manifest.tensors}
    assert kinds["layers.0.qkv"] == ("int8", "mse") and kinds["layers.0.shared.down"] == ("int8", "mse")
    assert kinds["layers.1.experts.3.gate_up"][0] == "int4" and kinds["layers.1.experts.3.down"][0] == "int8"
    assert kinds["lm_head"][0] == "float32"
    assert open_bundle(b).manifest.moe.fused is None            # QMoE needs one scheme for both expert matmuls


def test_zero_blocks_and_outliers():
    w = np.zeros((4, 64), np.float32)
    w[1, 3] = 1000.0
    q = quantize(w, QuantScheme(4, 32))
    np.testing.assert_array_equal(dequantize(q)[[0, 2, 3]], 0)
    assert dequantize(q)[1, 3] == pytest.approx(1000.0)


def test_bad_schemes_are_rejected():
    with pytest.raises(ValueError):
        QuantScheme(3, 32)
    with pytest.raises(ValueError):
        QuantScheme(4, 48)


def test_scales_are_stored_in_fp16_and_exact(tiny_bundle):
    """Dense weights keep fp16 scales on disk behind a Cast (folded at load); the values quantize()
    returns are fp16-exact, so the error it reports is the error onnxruntime computes with. The
    expert store keeps fp16 too, widened to the fp32 the expert graph takes when a session is built."""
    import onnx
    from edge.bundle import open_bundle
    w = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    for method in ("rtn", "mse"):
        s = quantize(w, QuantScheme(4, 32, method=method)).scales
        np.testing.assert_array_equal(s, s.astype(np.float16).astype(np.float32))
    b = tiny_bundle("mixtral", "int4")
    dtypes = {t.name: t.scale_dtype for t in open_bundle(b).manifest.tensors if t.dtype != "float32"}
    assert dtypes["layers.0.qkv"] == "float16" and dtypes["layers.0.experts.0.gate_up"] == "float16"
    store = {t.name: (t.dtype, t.load_as) for t in open_bundle(b).manifest.moe.expert_tensors}
    assert store["expert.gate_up.scales"] == store["expert.down.scales"] == ("float16", "float32")
    assert store["expert.gate_up.qweight"] == ("uint8", "")
    g = onnx.load(str(b / "layers.0.onnx"), load_external_data=False).graph
    half = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert "layers.0.o.scales" in half
    assert any(n.op_type == "Cast" and n.input[0] == "layers.0.o.scales" for n in g.node)


def test_int4_moe_defaults(tiny_bundle):
    """An int4 MoE keeps attention in int8 (q|k|v one fused projection, and o) and its experts in int4
    at block 64 where 64 divides both depths (tiny qwen3_moe: 64 and 64), else at 32 (tiny mixtral's
    expert FFN is 96); a dense int4 export keeps one fused int4 qkv at block 32. --block-size wins."""
    from edge.bundle import open_bundle

    def tensors(*args, **kw):
        return {t.name: (t.dtype, t.block_size) for t in open_bundle(tiny_bundle(*args, **kw)).manifest.tensors}
    moe = tensors("mixtral", "int4")
    assert moe["layers.0.qkv"] == moe["layers.0.o"] == moe["layers.1.o"] == ("int8", 32)
    assert moe["layers.0.experts.0.gate_up"] == moe["layers.1.experts.3.down"] == ("int4", 32)
    wide = tensors("qwen3_moe", "int4")
    assert wide["layers.0.o"] == ("int8", 32)
    assert wide["layers.0.experts.0.gate_up"] == wide["layers.1.experts.3.down"] == ("int4", 64)
    assert tensors("qwen3_moe", "int4", block_size=32)["layers.0.experts.0.gate_up"] == ("int4", 32)
    assert tensors("llama", "int4")["layers.0.qkv"] == ("int4", 32)


def _correlated_inputs(rng, t: int, k: int) -> np.ndarray:
    """Activations as real layers have them: channels of very different scales, most of the energy in a
    few directions (rank k/4 plus noise)."""
    x = rng.standard_normal((t, k // 4)) @ rng.standard_normal((k // 4, k)) + 0.1 * rng.standard_normal((t, k))
    return (x * np.exp(rng.standard_normal(k))).astype(np.float32)                          # [t, K]


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 16), (8, 32)])
def test_gptq_lowers_the_output_error_on_held_out_inputs(bits, block):
    """GPTQ minimises X (W - Q)^T, not W - Q: on inputs it did not see, from the same distribution,
    the layer's output error is well below the data-aware mse search's, at a higher weight error."""
    rng = np.random.default_rng(bits + block)
    k = 192
    w = (rng.standard_t(5, (256, k)) * 0.02).astype(np.float32)
    x = _correlated_inputs(rng, 4096, k)
    seen, held = x[:2048], x[2048:]
    imp = np.square(seen).mean(0)
    mse = quantize(w, QuantScheme(bits, block, True, "mse"), importance=imp)
    gptq = quantize(w, QuantScheme(bits, block, True, "gptq"), importance=imp, gram=seen.T @ seen)

    def out_err(q):
        return np.linalg.norm(held @ (w - dequantize(q)).T) / np.linalg.norm(held @ w.T)
    assert out_err(gptq) < 0.8 * out_err(mse)
    assert gptq.rms_rel_err > mse.rms_rel_err          # it trades weight error for output error


def test_gptq_without_statistics_is_the_mse_search():
    w = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    q = quantize(w, QuantScheme(4, 32, True, "gptq"))
    assert q.scheme.method == "mse"                    # what the manifest then records
    ref = quantize(w, QuantScheme(4, 32, True, "mse"))
    np.testing.assert_array_equal(q.packed, ref.packed)
