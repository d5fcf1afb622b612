import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from femtocc.errors import FemtoccError
from femtocc.frontend.onnx_export import load_onnx
from femtocc.frontend.onnx_ir import export_onnx, import_onnx
from femtocc.ir import print_graph
from test_passes import gelu_mlp


def test_ir_onnx_ir_round_trip_keeps_text_and_annotations():
    g = gelu_mlp()
    g.constants["fc1.weight"].attrs = {"encoding": {"format": "pencil8", "nnz": 96}}
    back = import_onnx(export_onnx(g), "mlp")
    assert back.constants["fc1.weight"].attrs == {"encoding": {"format": "pencil8", "nnz": 96}}
    assert back.op_counts() == g.op_counts()


def test_exported_folded_graph_runs_in_onnxruntime():
    from femtocc.ir import Interpreter
    from femtocc.passes import PassManager

    g = gelu_mlp()
    PassManager.parse("fold-gelu,fold-dense,dce").run(g)
    x = np.random.default_rng(0).standard_normal((1, 7, 8)).astype(np.float32)
    sess = ort.InferenceSession(export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], Interpreter(g).run({"x": x})[g.outputs[0].name], rtol=1e-5, atol=1e-6)


def _model(op_type, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node(op_type, ["x"], ["y"], name="the_node", **attrs)
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])


def test_unsupported_op_names_op_and_node():
    with pytest.raises(FemtoccError, match="node the_node: ONNX op Hardmax is not supported by femtocc"):
        import_onnx(_model("Hardmax"))


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(FemtoccError, match=r"bad.onnx: not a valid ONNX model"):
        load_onnx(bad)
    with pytest.raises(FemtoccError, match="no such ONNX file"):
        load_onnx(tmp_path / "missing.onnx")


def test_constant_nodes_become_constants():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [2.0])),
        helper.make_node("Mul", ["x", "c"], ["y"], name="m"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    g = import_onnx(model)
    assert "%c = const f32[] dense<2.0>" in print_graph(g)
    assert g.op_counts() == {"mul": 1}
