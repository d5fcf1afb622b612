"""ONNX <-> femtocc IR.

:func:`import_onnx` maps every node of the default ONNX domain whose op is in the IR vocabulary
(``Constant`` nodes become constants); anything else is a :class:`FemtoccError` naming the op and
the node. Types come from the model's ``value_info`` where the exporter wrote them, else from the
IR's own type rules; the result is verified.

:func:`export_onnx` writes opset 18: femtocc-only ops are spelled back in ONNX ops (``gelu`` as
Div/Erf/Add/Mul/Mul, ``dense`` as MatMul/Add), and constant annotations (sparse encoding,
quantization) travel in each initializer's ``doc_string`` so a round trip keeps them.
"""

from __future__ import annotations

import ast
import json

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir import dims
from femtocc.ir.core import DTYPES, Graph, Node, TensorType, Value
from femtocc.ir.ops import ONNX_TO_OP
from femtocc.ir.verify import infer_shapes, verify

OPSET = 18
IR_VERSION = 10
_ANNOTATION_PREFIX = "femtocc:"


def _onnx_dtypes():
    from onnx import TensorProto as T

    return {
        T.FLOAT: "f32", T.FLOAT16: "f16", T.DOUBLE: "f64", T.INT64: "i64", T.INT32: "i32",
        T.INT16: "i16", T.INT8: "i8", T.UINT8: "u8", T.BOOL: "bool",
    }


def _type_of(type_proto, what: str) -> TensorType | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    table = _onnx_dtypes()
    if tt.elem_type not in table:
        raise FemtoccError(f"{what}: ONNX element type {tt.elem_type} is not supported")
    if not tt.HasField("shape"):
        return None
    shape = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            shape.append(dims.canonical(d.dim_param))
        else:
            shape.append(dims.UNKNOWN)
    return TensorType(table[tt.elem_type], tuple(shape))


def _attr(a, node_name: str):
    from onnx import AttributeProto as A
    from onnx import numpy_helper

    if a.type == A.INT:
        return int(a.i)
    if a.type == A.FLOAT:
        return float(np.float32(a.f))
    if a.type == A.STRING:
        return a.s.decode()
    if a.type == A.INTS:
        return [int(x) for x in a.ints]
    if a.type == A.FLOATS:
        return [float(np.float32(x)) for x in a.floats]
    if a.type == A.STRINGS:
        return [s.decode() for s in a.strings]
    if a.type == A.TENSOR:
        return numpy_helper.to_array(a.t)
    raise FemtoccError(f"node {node_name}: attribute {a.name} has unsupported ONNX type {a.type}")


def _scope(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def import_onnx(model, name: str | None = None) -> Graph:
    from onnx import numpy_helper

    og = model.graph
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > OPSET + 5:
            raise FemtoccError(f"ONNX opset {opset.version} is newer than femtocc supports ({OPSET}..{OPSET + 5})")
    g = Graph(name or og.name or "main")
    env: dict[str, Value] = {}
    declared = {vi.name: vi.type for vi in list(og.value_info) + list(og.output)}

    for init in og.initializer:
        data = numpy_helper.to_array(init)
        attrs = {}
        if init.doc_string.startswith(_ANNOTATION_PREFIX):
            attrs = json.loads(init.doc_string[len(_ANNOTATION_PREFIX):])
        v = Value(init.name, TensorType.of(data), data=data, attrs=attrs)
        g.constants[v.name] = v
        env[v.name] = v
    for inp in og.input:
        if inp.name in env:
            continue
        ty = _type_of(inp.type, f"input {inp.name}")
        if ty is None:
            raise FemtoccError(f"graph input {inp.name}: no tensor type with a shape")
        env[inp.name] = g.add_input(inp.name, ty)

    for n in og.node:
        label = n.name or (n.output[0] if n.output else "?")
        if n.domain not in ("", "ai.onnx"):
            raise FemtoccError(f"node {label}: op {n.domain}::{n.op_type} is not supported (custom domain)")
        attrs = {a.name: _attr(a, label) for a in n.attribute}
        if n.op_type == "Constant":
            data = attrs.get("value")
            if data is None:
                key = next(iter(attrs), None)
                if key not in ("value_float", "value_int", "value_floats", "value_ints"):
                    raise FemtoccError(f"node {label}: Constant with attribute {key} is not supported")
                data = np.array(attrs[key], dtype=np.float32 if "float" in key else np.int64)
            v = Value(n.output[0], TensorType.of(data), data=np.asarray(data))
            g.constants[v.name] = v
            env[v.name] = v
            continue
        if n.op_type not in ONNX_TO_OP:
            raise FemtoccError(
                f"node {label}: ONNX op {n.op_type} is not supported by femtocc "
                f"(supported: {', '.join(sorted(ONNX_TO_OP))})"
            )
        op = ONNX_TO_OP[n.op_type]
        attrs = _normalise_attrs(op, attrs, label)
        inputs = list(n.input)
        while inputs and inputs[-1] == "":
            inputs.pop()
        if "" in inputs:
            raise FemtoccError(f"node {label}: omitted optional inputs in the middle are not supported")
        for x in inputs:
            if x not in env:
                raise FemtoccError(f"node {label}: input {x} is not defined before it (graph not topologically sorted?)")
        outs = []
        for o in n.output:
            ty = _type_of(declared[o], f"value {o}") if o in declared else None
            outs.append(Value(o, ty or TensorType("f32", ())))
        node = Node(op, [env[x] for x in inputs], outs, attrs, {"scope": _scope(n), "source": n.name} if n.name else {})
        node.meta = {k: v for k, v in node.meta.items() if v}
        g.nodes.append(node)
        undeclared = [o for o in n.output if o not in declared]
        if undeclared:
            _infer_node(g, node)
        for v in outs:
            env[v.name] = v
    for o in og.output:
        if o.name not in env:
            raise FemtoccError(f"graph output {o.name} is not produced by any node")
        g.outputs.append(env[o.name])
    infer_shapes(g)
    verify(g)
    return g


def _infer_node(g: Graph, node: Node) -> None:
    from femtocc.ir.ops import OpError, infer_types

    consts = [v.data if v.is_constant else None for v in node.inputs]
    try:
        types = infer_types(node.op, [v.type for v in node.inputs], node.attrs, consts)
    except OpError as e:
        raise FemtoccError(f"node {node.meta.get('source', node.op)}: {e}") from None
    for v, t in zip(node.outputs, types):
        v.type = t


def _normalise_attrs(op: str, attrs: dict, label: str) -> dict:
    """ONNX attribute spellings -> IR ones (dtype names, no defaults that carry no meaning)."""
    if attrs.get("auto_pad", "NOTSET") != "NOTSET":
        raise FemtoccError(f"node {label}: auto_pad={attrs['auto_pad']} is not supported; export with explicit pads")
    attrs.pop("auto_pad", None)
    attrs.pop("kernel_shape", None)  # implied by the weight
    if op == "cast":
        table = _onnx_dtypes()
        if attrs["to"] not in table:
            raise FemtoccError(f"node {label}: Cast to ONNX type {attrs['to']} is not supported")
        attrs["to"] = table[attrs["to"]]
    if op == "constant_of_shape":
        value = attrs.pop("value", np.zeros(1, np.float32))
        attrs["dtype"] = TensorType.of(value).dtype
        attrs["value"] = value.reshape(-1)[0].item()
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            raise FemtoccError(f"node {label}: tensor attribute {k} is not supported on {op}")
    return attrs


# ----------------------------------------------------------------------------- export


def export_onnx(g: Graph):
    import onnx
    from onnx import helper, numpy_helper

    to_onnx = {v: k for k, v in _onnx_dtypes().items()}
    nodes, inits = [], []
    taken = g.names()

    def fresh(hint):
        name = g.fresh_name(hint, taken)
        taken.add(name)
        return name

    def const(hint, array):
        name = fresh(hint)
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def info(v: Value):
        shape = [None if d == dims.UNKNOWN else d for d in v.type.shape]
        return helper.make_tensor_value_info(v.name, to_onnx[v.type.dtype], shape)

    for v in g.constants.values():
        if v.data is None:
            raise FemtoccError(f"constant %{v.name} has no data; load the graph with its weights file")
        t = numpy_helper.from_array(v.data, v.name)
        if v.attrs:
            t.doc_string = _ANNOTATION_PREFIX + json.dumps(v.attrs, sort_keys=True)
        inits.append(t)
    for node in g.nodes:
        ins = [v.name for v in node.inputs]
        outs = [v.name for v in node.outputs]
        kw = {"name": node.meta.get("source") or fresh(f"node_{node.op}")}
        if node.op == "gelu":
            x, y = ins[0], outs[0]
            dt = DTYPES[node.outputs[0].type.dtype]
            t1, t2, t3, t4 = (fresh(f"{y}_gelu{i}") for i in range(4))
            nodes += [
                helper.make_node("Div", [x, const("sqrt2", dt(np.sqrt(2.0)))], [t1]),
                helper.make_node("Erf", [t1], [t2]),
                helper.make_node("Add", [t2, const("one", dt(1.0))], [t3]),
                helper.make_node("Mul", [x, t3], [t4]),
                helper.make_node("Mul", [t4, const("half", dt(0.5))], [y], **kw),
            ]
            continue
        if node.op == "dense":
            if len(ins) == 2:
                nodes.append(helper.make_node("MatMul", ins, outs, **kw))
            else:
                mm = fresh(f"{outs[0]}_matmul")
                nodes += [helper.make_node("MatMul", ins[:2], [mm]), helper.make_node("Add", [mm, ins[2]], outs, **kw)]
            continue
        from femtocc.ir.ops import OPS

        if OPS[node.op].onnx is None:
            raise FemtoccError(f"op {node.op} (node %{node.outputs[0].name}) has no ONNX form; run this graph with the IR interpreter")
        attrs = dict(node.attrs)
        if node.op == "cast":
            attrs["to"] = to_onnx[attrs["to"]]
        if node.op == "constant_of_shape":
            dtype = attrs.pop("dtype", "f32")
            attrs["value"] = numpy_helper.from_array(np.array([attrs.get("value", 0)], dtype=DTYPES[dtype]))
        nodes.append(helper.make_node(OPS[node.op].onnx, ins, outs, **kw, **attrs))
    value_info = [info(v) for n in g.nodes for v in n.outputs if v not in g.outputs]
    graph = helper.make_graph(
        nodes, g.name, [info(v) for v in g.inputs], [info(v) for v in g.outputs], inits, value_info=value_info
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="femtocc")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
