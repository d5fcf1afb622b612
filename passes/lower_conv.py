"""lower-conv: a 1-D ``conv`` with a constant weight becomes ``transpose(dense(im2col(x)))``.

``conv(x[N, C, L], W[out, C, K], b)`` equals ``im2col(x) @ W.reshape(out, C * K).T + b``
transposed back to ``[N, out, L_out]`` (the ``im2col`` row order, kernel index fastest, is the
one calibration and pruning use for a convolution's weight matrix). Afterwards no ``conv`` with a
constant weight remains, so quantization, layout selection and code generation see one kind of
weighted layer, the ``dense``; the node keeps the conv's scope (module path).
"""

from __future__ import annotations

from femtocc.ir.core import TensorType
from femtocc.passes.manager import Pass, register
from femtocc.passes.patterns import replace_result


@register
class LowerConv(Pass):
    name = "lower-conv"

    def run(self, graph):
        lowered = 0
        for conv in [n for n in graph.nodes if n.op == "conv" and n.inputs[1].is_constant]:
            x, w = conv.inputs[0], conv.inputs[1]
            out_ch, channels, k = w.data.shape
            attrs = {"kernel": k, "stride": conv.attrs.get("strides", [1])[0],
                     "dilation": conv.attrs.get("dilations", [1])[0], "pads": list(conv.attrs.get("pads", [0, 0]))}
            y = conv.outputs[0]
            cols = graph.make_node("im2col", [x], [TensorType(x.type.dtype, (x.type.shape[0], y.type.shape[2], channels * k))],
                                   attrs, conv.meta, names=[f"{y.name}.cols"], before=conv).outputs[0]
            matrix = graph.add_constant(w.name, w.data.reshape(out_ch, channels * k).T.copy(), attrs=dict(w.attrs))
            inputs = [cols, matrix] + conv.inputs[2:3]
            rows = graph.make_node("dense", inputs, [TensorType(y.type.dtype, (y.type.shape[0], y.type.shape[2], out_ch))],
                                   meta=conv.meta, names=[f"{y.name}.rows"], before=conv).outputs[0]
            t = graph.make_node("transpose", [rows], [y.type], {"perm": [0, 2, 1]}, conv.meta, before=conv).outputs[0]
            replace_result(graph, y, t)
            graph.erase_node(conv)
            lowered += 1
        for name in [n for n, v in graph.constants.items() if not v.users]:
            del graph.constants[name]
        return {"lowered": lowered}
