"""spu001 as a TVM Relax external codegen: partition, compile with tvm.compile, run in the VM."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from femtocc.targets.spu001.tvm import REGIONS, offload_report, partition_for_spu001  # noqa: E402


def toy(seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((32, 64)).astype("float32")
    b = rng.standard_normal(64).astype("float32")

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((6, 32), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.const(w))
                z = R.add(y, R.const(b))
                s = R.nn.softmax(z, axis=-1)
                o = R.nn.relu(s)
                R.output(o)
            return o

    def reference(x):
        z = x @ w + b
        e = np.exp(z - z.max(-1, keepdims=True))
        return np.maximum(e / e.sum(-1, keepdims=True), 0)

    return Module, reference


def run(mod, x):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("runtime", ["reference", "sim"])
def test_offloaded_regions_run_femtocc_programs(runtime):
    module, reference = toy(0)
    before = set(REGIONS)
    mod = partition_for_spu001(module, runtime=runtime)
    mine = [r for s, r in REGIONS.items() if s not in before]
    report = offload_report(mod)
    assert report["spu001_regions"] >= 1 and report["cpu_ops"] == {"relax.nn.relu": 1}  # relu stays on the CPU
    x = np.random.default_rng(5).standard_normal((6, 32)).astype("float32")
    out = run(mod, x)
    assert np.abs(out - reference(x)).max() < 0.05  # int8 weights, int16 activations
    # neighbours merge into one region (dense + bias + softmax), which computes exactly what its
    # femtocc program computes on its own
    (region,) = mine
    assert region.program.startswith(b"SPU\0") and region.graph.op_counts() == {"dense": 1, "softmax": 1}
    alone = region.run_program({region.graph.inputs[0].name: x})[region.graph.outputs[0].name]
    assert np.array_equal(np.maximum(alone, 0), out)


def test_two_models_with_the_same_graph_do_not_share_regions():
    """Workaround: TVM's external symbols are process-global; partition_for_spu001 makes them unique."""
    (m1, ref1), (m2, ref2) = toy(1), toy(2)
    mod1, mod2 = partition_for_spu001(m1), partition_for_spu001(m2)
    x = np.random.default_rng(3).standard_normal((6, 32)).astype("float32")
    out1, out2 = run(mod1, x), run(mod2, x)
    assert np.abs(out1 - ref1(x)).max() < 0.05 and np.abs(out2 - ref2(x)).max() < 0.05


def test_tiny_en_encoder_through_tvm(tiny, tiny_onnx, features):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from femtocc.decode import ort_runner

    mod = partition_for_spu001(from_onnx(onnx.load(str(tiny_onnx["encoder"])), keep_params_in_input=False))
    report = offload_report(mod)
    # everything but the two convolutions (and their bias reshapes) runs on spu001
    assert report["spu001_regions"] >= 2 and set(report["cpu_ops"]) == {"relax.nn.conv1d", "relax.reshape"}
    out = run(mod, features)
    ref = ort_runner(tiny_onnx["encoder"])({"input_features": features})["encoder_hidden_states"]
    # quantization tolerance: femtocc's own whole-encoder program is within 0.1 (max, relative) of onnxruntime
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.15
    assert np.abs(out - ref).mean() / np.abs(ref).mean() < 0.05
