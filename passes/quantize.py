"""quantize: the whole float data path becomes integer ops (W8A16 by default; W4A8 option).

Input: a float graph after ``lower-conv`` whose float values carry their calibrated range
(``attrs["range"]``, put there by :func:`femtocc.passes.calibrate.attach_ranges`), or a ranges file
(``quantize{ranges=PATH}``: ``{"encoder:gelu_6": 3.1, ...}``, keys as
:func:`~femtocc.passes.calibrate.range_key`). Every float activation gets a static symmetric
scale ``range / qmax(act-bits)``; then, node by node:

* ``dense`` -> ``qdense``: weights per output channel (``weight-bits``, or the constant's own
  ``weight_bits`` where a plan chose a width per layer; int4 held in int8; on the grid a constant's
  ``weight_scale`` names when GPTQ already rounded it), pruned zeros stay zero;
  bias at scale ``x_scale * w_scale[c]``; per-channel multipliers.
* ``matmul`` -> ``qmatmul``; ``add`` -> ``qadd``; ``mul`` by a constant -> ``requantize``.
* ``gelu`` -> ``qgelu`` and ``softmax`` -> ``qsoftmax``: interpolated tables of 1025 (A16) or 257
  (A8) int32 entries, 4 KiB / 1 KiB of the 16 KiB table memory; ``layer_norm`` ->
  ``qlayer_norm`` (integer mean and variance, exact integer square root).
* a gather from a constant 2-D table (token embedding) -> ``qgather`` (int8, per-row scales, stored
  like a qdense weight so the output projection tied to it shares the one table). ``vocab-bits``
  (4 or 8; 0: as before; the table constant's own ``weight_bits`` and ``weight_scale`` first) sets
  that table's precision and always ties the output projection to it:
  ``vocab-bits=4`` halves the bytes every decoder step streams for the vocabulary projection;
  data movement (transpose, reshape, concat, slice, gather, im2col, where, ...) runs unchanged on
  integers, keeping its input's scale; operands that must share a scale get a ``requantize``.
* float nodes whose inputs are all constant are evaluated now and become constants.

Graph inputs are quantized by ``quantize`` nodes and graph outputs dequantized, so the graph keeps
its float interface (and still runs in the interpreter, integer or fake-quant); code generation
turns those boundary nodes into the program's integer inputs and outputs with their scales.
Afterwards no float op remains between the boundary nodes: a float op without an integer form is
an error naming the node.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir.core import DTYPES, TensorType
from femtocc.ir.ops import OPS
from femtocc.ir.qops import qdtype, qmax, softmax_table_entries
from femtocc.passes.calibrate import range_key
from femtocc.passes.manager import Pass, register
from femtocc.passes.patterns import scalar

MULTIPLIER_BITS = 24
TABLE_INDEX_BITS = 10  # tables have 2**10 + 1 entries for 16-bit inputs
SCALE_PRESERVING = {"transpose", "reshape", "squeeze", "unsqueeze", "slice", "identity", "im2col", "expand", "tile", "gather", "gather_nd"}


def quantize_weight(w_in_out: np.ndarray, bits: int, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric quantization of a [in, out] weight: (int8 values, scales).
    ``scale`` (per output) is the grid a weight was already rounded to (GPTQ), else ``max|w| / qmax``."""
    if scale is None:
        peak = np.abs(w_in_out).max(axis=0).astype(np.float64)
        scale = np.where(peak > 0, peak / qmax(bits), 1.0)
    scale = np.asarray(scale, np.float64)
    q = np.clip(np.rint(w_in_out / scale[None, :]), -qmax(bits), qmax(bits)).astype(np.int8)
    return q, scale.astype(np.float32)


def requant_multipliers(real: np.ndarray, acc_bound: float = 2.0**34) -> tuple[np.ndarray, int]:
    """Integer multipliers and one shift with ``M / 2**shift ~= real``; ``max M`` stays below
    ``2**MULTIPLIER_BITS`` and ``acc_bound * max M`` below ``2**62``, so nothing overflows int64."""
    real = np.atleast_1d(np.asarray(real, np.float64))
    top = float(np.abs(real).max())
    if top <= 0:
        raise FemtoccError("requantization scale must be nonzero")
    bits = min(MULTIPLIER_BITS, 62 - math.ceil(math.log2(max(acc_bound, 2.0))))
    shift = max(1, min(bits - 1 - math.ceil(math.log2(top)), 62))
    return np.rint(real * 2.0**shift).astype(np.int64), shift


def load_ranges(path: str) -> dict[str, float]:
    try:
        ranges = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FemtoccError(f"quantize: ranges file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise FemtoccError(f"quantize: ranges file {path} is not JSON ({e})") from None
    if not isinstance(ranges, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in ranges.values()):
        raise FemtoccError(f"quantize: ranges file {path} must map value keys to non-negative numbers")
    return ranges


def _is_float(v) -> bool:
    return v.type.dtype in ("f32", "f16", "f64")


class _Quantizer:
    def __init__(self, graph, ranges: dict[str, float], weight_bits: int, act_bits: int, vocab_bits: int = 0):
        self.g, self.ranges, self.wbits, self.abits = graph, ranges, weight_bits, act_bits
        self.vbits = vocab_bits
        self.qa = qmax(act_bits)
        self.act = qdtype(act_bits)
        self.ints: dict[int, tuple] = {}  # id(float value) -> (integer value, scale)
        self.folded: dict[int, object] = {}  # id(float value) -> float constant holding its data
        self.tied: dict[int, tuple] = {}  # id(float table) -> (int8 [dim, rows] constant, scales) of a qgather
        self.stats = {"quantized": 0, "folded": 0, "requantize": 0}

    # -------------------------------------------------------------- scales and operands
    def scale(self, v) -> float:
        key = range_key(self.g, v)
        if key not in self.ranges:
            raise FemtoccError(f"quantize: no calibrated range for %{v.name} in @{self.g.name} (key {key!r}); "
                               "calibrate the same graph and pipeline")
        return max(float(self.ranges[key]), 1e-12) / self.qa

    def own_bits(self, const, default: int) -> int:
        """A weight constant's width: its own ``weight_bits`` (a plan's per-layer choice) or ``default``."""
        bits = const.attrs.get("weight_bits", default)
        if bits not in (4, 8):
            raise FemtoccError(f"quantize: %{const.name} in @{self.g.name} has weight_bits {bits!r}; give 4 or 8")
        return bits

    def const(self, hint: str, data: np.ndarray):
        return self.g.add_constant(hint, data)

    def node(self, op, inputs, attrs, like, before, dtype=None, shape=None):
        out_type = TensorType(dtype or self.act, shape if shape is not None else like.type.shape)
        n = self.g.make_node(op, inputs, [out_type], attrs, before.meta, names=[like.name + ".q"], before=before)
        return n.outputs[0]

    def constant_data(self, v):
        if id(v) in self.folded:
            return self.folded[id(v)].data
        return v.data if v.is_constant else None

    def operand(self, v, before, scale: float | None = None):
        """(integer value, scale) of float value ``v``; at ``scale`` when given (requantized)."""
        data = self.constant_data(v)
        if data is not None:
            s = scale or max(float(np.abs(data).max()), 1e-12) / self.qa
            q = np.clip(np.rint(data.astype(np.float64) / s), -self.qa, self.qa).astype(DTYPES[self.act])
            return self.const(v.name + ".q", q), s
        if id(v) not in self.ints:  # a float graph input
            s = self.scale(v)
            first = self.g.nodes[0]
            q = self.node("quantize", [v], {"scale": s, "bits": self.abits}, v, first)
            self.ints[id(v)] = (q, s)
        q, s = self.ints[id(v)]
        if scale is not None and scale != s:
            mult, shift = requant_multipliers(np.array([s / scale]), 2.0**self.abits)
            q = self.node("requantize", [q], {"mult": int(mult[0]), "shift": shift, "bits": self.abits,
                                              "x_scale": s, "y_scale": scale, "factor": 1.0}, q, before)
            self.stats["requantize"] += 1
            s = scale
        return q, s

    # -------------------------------------------------------------- ops
    def run(self):
        g = self.g
        for node in list(g.nodes):
            floats_in = [v for v in node.inputs if _is_float(v)]
            floats_out = [v for v in node.outputs if _is_float(v)]
            if not floats_out:  # index arithmetic; ``shape`` reads only a float value's dims
                if floats_in and node.op != "shape":
                    raise FemtoccError(f"quantize: node %{node.outputs[0].name} ({node.op}) in @{g.name} computes integers from float data")
                continue
            if all(v.is_constant or id(v) in self.folded for v in node.inputs):
                data = OPS[node.op].run([self.constant_data(v) for v in node.inputs], node.attrs)
                for v, d in zip(node.outputs, data):
                    self.folded[id(v)] = self.const(v.name + ".folded", np.asarray(d))
                self.stats["folded"] += 1
                continue
            handler = getattr(self, "op_" + node.op, None)
            if handler is None and node.op in SCALE_PRESERVING:
                handler = self.op_move
            if handler is None or len(floats_out) != 1:
                raise FemtoccError(f"quantize: node %{node.outputs[0].name} ({node.op}) in @{g.name} has no integer form on spu001")
            out = node.outputs[0]
            self.ints[id(out)] = handler(node, out)
            self.stats["quantized"] += 1
        for i, v in enumerate(list(g.outputs)):
            if _is_float(v):
                if id(v) not in self.ints:
                    raise FemtoccError(f"quantize: output %{v.name} of @{g.name} is not computed on the integer path")
                q, s = self.ints[id(v)]
                name, v.name = v.name, v.name + ".float"  # the output keeps its name
                deq = g.make_node("dequantize", [q], [v.type], {"scale": s}, names=[name]).outputs[0]
                g.outputs[i] = deq
        for node in reversed(list(g.nodes)):
            if node.op not in ("quantize", "dequantize") and any(_is_float(v) for v in node.outputs):
                if not any(v.users for v in node.outputs):
                    g.erase_node(node)
        for name in [n for n, v in g.constants.items() if not v.users]:
            del g.constants[name]
        return self.stats

    def op_dense(self, node, out):
        x, w = node.inputs[0], node.inputs[1]
        if self.constant_data(w) is None:
            raise FemtoccError(f"quantize: dense %{out.name} has a non-constant weight")
        xq, sx = self.operand(x, node)
        sy = self.scale(out)
        source = w.producer.inputs[0] if w.producer is not None and w.producer.op == "transpose" else None
        tied = source is not None and id(source) in self.tied
        if tied and (self.vbits or self.wbits == 8 or "weight_bits" in source.attrs):
            c_w, sw = self.tied[id(source)]  # the output projection tied to the token embedding: one table
            wq = c_w.data
        else:
            bits = self.own_bits(w, self.wbits)
            wq, sw = quantize_weight(self.constant_data(w), bits, w.attrs.get("weight_scale"))
            c_w = None
        bias = self.constant_data(node.inputs[2]) if len(node.inputs) > 2 else np.zeros(wq.shape[1], np.float32)
        bias_q = np.rint(bias.astype(np.float64) / (sx * sw.astype(np.float64))).astype(np.int64)
        mult, shift = requant_multipliers(sx * sw.astype(np.float64) / sy)
        if c_w is None:
            attrs = {k: v for k, v in w.attrs.items() if k not in ("weight_scale", "weight_bits")}
            attrs["quant"] = {"bits": bits, "axis": 1, "scheme": "symmetric-per-channel"}
            c_w = self.g.add_constant(w.name + ".q", wq, attrs=attrs)
        inputs = [xq, c_w, self.const(w.name + ".bias_q", bias_q), self.const(w.name + ".multiplier", mult),
                  self.const(w.name + ".scale", sw)]
        shape = (*xq.type.shape[:-1], wq.shape[1])
        return self.node("qdense", inputs, {"shift": shift, "bits": self.abits, "x_scale": sx, "y_scale": sy}, out, node, shape=shape), sy

    def op_matmul(self, node, out):
        w = self.constant_data(node.inputs[1])
        if w is not None and w.ndim == 2:  # a weight (e.g. the output projection tied to the embedding)
            return self.op_dense(node, out)
        (a, sa), (b, sb) = (self.operand(v, node) for v in node.inputs)
        sy = self.scale(out)
        k = node.inputs[0].type.shape[-1]
        bound = (k if isinstance(k, int) else 4096) * float(self.qa) ** 2
        mult, shift = requant_multipliers(np.array([sa * sb / sy]), bound)
        attrs = {"mult": int(mult[0]), "shift": shift, "bits": self.abits, "a_scale": sa, "b_scale": sb, "y_scale": sy}
        return self.node("qmatmul", [a, b], attrs, out, node), sy

    def op_add(self, node, out):
        (a, sa), (b, sb) = (self.operand(v, node) for v in node.inputs)
        sy = self.scale(out)
        mult, shift = requant_multipliers(np.array([sa / sy, sb / sy]), 2.0**self.abits)
        attrs = {"mult_a": int(mult[0]), "mult_b": int(mult[1]), "shift": shift, "bits": self.abits,
                 "a_scale": sa, "b_scale": sb, "y_scale": sy}
        return self.node("qadd", [a, b], attrs, out, node), sy

    def op_mul(self, node, out):
        a, b = node.inputs
        factor, x = (scalar(b), a) if scalar(b) is not None else (scalar(a), b)
        if factor is None or factor <= 0 or self.constant_data(x) is not None:
            raise FemtoccError(f"quantize: mul %{out.name} in @{self.g.name} must multiply an activation by a positive constant scalar")
        xq, sx = self.operand(x, node)
        sy = self.scale(out)
        mult, shift = requant_multipliers(np.array([sx * factor / sy]), 2.0**self.abits)
        attrs = {"mult": int(mult[0]), "shift": shift, "bits": self.abits, "x_scale": sx, "y_scale": sy, "factor": factor}
        return self.node("requantize", [xq], attrs, out, node), sy

    def _table_step(self) -> int:
        return max(self.abits - TABLE_INDEX_BITS, 0)

    def op_gelu(self, node, out):
        from scipy import special

        xq, sx = self.operand(node.inputs[0], node)
        sy = self.scale(out)
        k = self._table_step()
        grid = (np.arange((1 << (self.abits - k)) + 1, dtype=np.float64) * (1 << k) - (1 << (self.abits - 1))) * sx
        # unclipped, so interpolation next to the saturation point stays exact; the op saturates after
        table = np.clip(np.rint(0.5 * grid * (1 + special.erf(grid / np.sqrt(2.0))) / sy), -2**31, 2**31 - 1)
        attrs = {"step_bits": k, "bits": self.abits, "x_scale": sx, "y_scale": sy}
        return self.node("qgelu", [xq, self.const(out.name + ".table", table.astype(np.int32))], attrs, out, node), sy

    def op_softmax(self, node, out):
        axis = node.attrs.get("axis", -1)
        if axis not in (-1, node.inputs[0].type.rank - 1):
            raise FemtoccError(f"quantize: softmax %{out.name} must run over the last axis, got axis={axis}")
        xq, sx = self.operand(node.inputs[0], node)
        k = self._table_step()
        n = softmax_table_entries(self.abits, k)
        table = np.rint(2.0**15 * np.exp(-np.arange(n, dtype=np.float64) * (1 << k) * sx)).astype(np.int32)
        attrs = {"step_bits": k, "bits": self.abits, "x_scale": sx}
        return self.node("qsoftmax", [xq, self.const(out.name + ".table", table)], attrs, out, node), 2.0 ** -(self.abits - 1)

    def op_layer_norm(self, node, out):
        x = node.inputs[0]
        if node.attrs.get("axis", -1) not in (-1, x.type.rank - 1):
            raise FemtoccError(f"quantize: layer_norm %{out.name} must normalise the last axis")
        xq, sx = self.operand(x, node)
        sy = self.scale(out)
        gamma = self.constant_data(node.inputs[1]).astype(np.float64)
        beta = self.constant_data(node.inputs[2]).astype(np.float64) if len(node.inputs) > 2 else np.zeros_like(gamma)
        peak = max(float(np.abs(gamma).max()) / sy, 1e-12)
        if peak >= 2**20:
            raise FemtoccError(f"quantize: layer_norm %{out.name}: gamma / output scale = {peak:.3g} exceeds 2**20")
        gamma_shift = max(19 - math.ceil(math.log2(peak)), 0)  # |gamma| <= 2**20: (c * gamma) << f stays below 2**57
        eps = int(min(max(1, round(node.attrs.get("epsilon", 1e-5) / (sx * sx))), 2**40))
        inputs = [xq, self.const(out.name + ".gamma", np.rint(gamma / sy * 2.0**gamma_shift).astype(np.int32)),
                  self.const(out.name + ".beta", np.clip(np.rint(beta / sy), -2**31, 2**31 - 1).astype(np.int32))]
        attrs = {"eps": eps, "gamma_shift": gamma_shift, "bits": self.abits, "x_scale": sx, "y_scale": sy}
        return self.node("qlayer_norm", inputs, attrs, out, node), sy

    def op_gather(self, node, out):
        table = self.constant_data(node.inputs[0])
        if table is None or table.ndim != 2 or node.attrs.get("axis", 0) != 0:
            return self.op_move(node, out)
        sy = self.scale(out)
        attrs = node.inputs[0].attrs
        bits = self.own_bits(node.inputs[0], self.vbits or 8)
        q, row_scale = quantize_weight(table.T, bits, attrs.get("weight_scale"))  # [dim, rows]: a qdense weight's layout, shared if tied
        c_q = self.g.add_constant(node.inputs[0].name + ".q", q, attrs={"quant": {"bits": bits, "axis": 1, "scheme": "symmetric-per-channel"}})
        self.tied[id(node.inputs[0])] = (c_q, row_scale)
        mult, shift = requant_multipliers(row_scale.astype(np.float64) / sy, 2.0 ** (bits - 1))
        inputs = [c_q, self.const(node.inputs[0].name + ".multiplier", mult), node.inputs[1]]
        return self.node("qgather", inputs, {"shift": shift, "bits": self.abits, "y_scale": sy}, out, node), sy

    def op_concat(self, node, out):
        scale = self.scale(out)
        parts = [self.operand(v, node, scale)[0] for v in node.inputs]
        return self.node(node.op, parts, dict(node.attrs), out, node), scale

    def op_where(self, node, out):
        cond, a, b = node.inputs
        live = [v for v in (a, b) if self.constant_data(v) is None]
        scale = self.operand(live[0], node)[1] if len(live) == 1 else self.scale(out)
        qa, qb = (self.operand(v, node, scale)[0] for v in (a, b))
        return self.node("where", [cond, qa, qb], {}, out, node), scale

    def op_move(self, node, out):
        """Data movement: the same op on integers, at the scale of its (first) float input."""
        inputs, scale = [], None
        for v in node.inputs:
            if _is_float(v):
                q, s = self.operand(v, node, scale)
                scale = s
                inputs.append(q)
            else:
                inputs.append(v)
        return self.node(node.op, inputs, dict(node.attrs), out, node), scale


@register
class Quantize(Pass):
    name = "quantize"
    ranges: str = ""
    weight_bits: int = 8
    act_bits: int = 16
    vocab_bits: int = 0  # the token table (embedding and tied output projection): 4, 8, or 0 (as before)

    def run(self, graph):
        if self.weight_bits not in (4, 8) or self.act_bits not in (8, 16):
            raise FemtoccError(f"quantize: weight-bits must be 4 or 8 and act-bits 8 or 16, got {self.weight_bits}, {self.act_bits}")
        if self.vocab_bits not in (0, 4, 8):
            raise FemtoccError(f"quantize: vocab-bits must be 4 or 8 (or 0: as before), got {self.vocab_bits}")
        if self.ranges:
            ranges = load_ranges(self.ranges)
        else:
            from femtocc.passes.calibrate import range_key

            ranges = {range_key(graph, v): float(v.attrs["range"]) for v in graph.values().values() if "range" in v.attrs}
            if not ranges:
                raise FemtoccError("quantize needs calibrated ranges: values with attrs['range'] (femtocc compile "
                                   "calibrates them) or quantize{ranges=PATH}")
        return _Quantizer(graph, ranges, self.weight_bits, self.act_bits, self.vocab_bits).run()
