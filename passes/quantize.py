"""quantize: ``dense`` layers to integer ``qdense`` with static scales (W8A16 by default).

For every ``dense`` node whose scope (module path) has calibrated activation ranges:

* weights: per-output-channel symmetric, ``weight-bits`` (8, or 4 stored in int8), scale
  ``max|W[:, c]| / qmax``; pruned zeros stay exactly zero, so sparsity survives quantization;
* activations: symmetric ``act-bits`` (16, or 8) with static scales ``range / qmax`` from the
  calibration ranges of the layer's input and output;
* bias: int64 at scale ``x_scale * w_scale[c]``; requantization: per-channel integer multipliers
  ``M[c] = round(x_scale * w_scale[c] / y_scale * 2**shift)`` with ``shift`` chosen so every
  ``M[c] < 2**MULTIPLIER_BITS``.

The node becomes ``quantize -> qdense -> dequantize``, so float neighbours (layer norm, softmax,
GELU, the output projection, convolutions) are unchanged in this version; the quantized weight
constant is annotated ``quant = {bits, axis, scheme}`` and keeps its ``sparsity`` annotation.
Afterwards no annotated-range ``dense`` remains.

Ranges come from :func:`femtocc.passes.calibrate.collect_ranges` as a JSON file
(``{"encoder.layers.0.fc1": {"input": 3.2, "output": 7.9}, ...}``) named by the ``ranges`` option.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.ir.core import TensorType
from femtocc.ir.ops import qmax
from femtocc.passes.manager import Pass, register
from femtocc.passes.patterns import replace_result

MULTIPLIER_BITS = 24  # acc (< 2**34 for K <= 4096) * M stays below 2**63


def quantize_weight(w_in_out: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric quantization of a [in, out] weight: (int8 values, scales)."""
    peak = np.abs(w_in_out).max(axis=0).astype(np.float64)
    scale = np.where(peak > 0, peak / qmax(bits), 1.0)
    q = np.clip(np.rint(w_in_out / scale[None, :]), -qmax(bits), qmax(bits)).astype(np.int8)
    return q, scale.astype(np.float32)


def requant_multipliers(real: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer multipliers and one shift with ``M / 2**shift ~= real`` and ``max M < 2**MULTIPLIER_BITS``."""
    top = float(real.max())
    if top <= 0:
        raise FemtoccError("requantization scale must be positive")
    shift = MULTIPLIER_BITS - 1 - math.ceil(math.log2(top))
    shift = max(1, min(shift, 62))
    return np.rint(real * 2.0**shift).astype(np.int64), shift


def load_ranges(path: str) -> dict:
    try:
        ranges = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FemtoccError(f"quantize: ranges file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise FemtoccError(f"quantize: ranges file {path} is not JSON ({e})") from None
    for scope, r in ranges.items():
        if not (isinstance(r, dict) and r.get("input", 0) > 0 and r.get("output", 0) > 0):
            raise FemtoccError(f"quantize: ranges file {path}: {scope!r} needs positive 'input' and 'output'")
    return ranges


@register
class Quantize(Pass):
    name = "quantize"
    ranges: str = ""
    weight_bits: int = 8
    act_bits: int = 16

    def run(self, graph):
        if self.weight_bits not in (4, 8) or self.act_bits not in (8, 16):
            raise FemtoccError(f"quantize: weight-bits must be 4 or 8 and act-bits 8 or 16, got {self.weight_bits}, {self.act_bits}")
        if not self.ranges:
            raise FemtoccError("quantize needs calibrated ranges: quantize{ranges=PATH}")
        ranges = load_ranges(self.ranges)
        done = 0
        qa = qmax(self.act_bits)
        for node in [n for n in graph.nodes if n.op == "dense"]:
            r = ranges.get(node.meta.get("scope", ""))
            w = node.inputs[1]
            if r is None or not w.is_constant:
                continue
            x, out = node.inputs[0], node.outputs[0]
            sx, sy = r["input"] / qa, r["output"] / qa
            wq, sw = quantize_weight(w.data, self.weight_bits)
            bias = node.inputs[2].data if len(node.inputs) > 2 else np.zeros(wq.shape[1], np.float32)
            bias_q = np.rint(bias.astype(np.float64) / (sx * sw.astype(np.float64))).astype(np.int64)
            mult, shift = requant_multipliers(sx * sw.astype(np.float64) / sy)
            attrs = {**w.attrs, "quant": {"bits": self.weight_bits, "axis": 1, "scheme": "symmetric-per-channel"}}
            c_w = graph.add_constant(w.name + ".q", wq, attrs=attrs)
            c_s = graph.add_constant(w.name + ".scale", sw)
            c_b = graph.add_constant(w.name + ".bias_q", bias_q)
            c_m = graph.add_constant(w.name + ".multiplier", mult)
            act = "i8" if self.act_bits <= 8 else "i16"
            meta = node.meta
            xq = graph.make_node("quantize", [x], [TensorType(act, x.type.shape)],
                                 {"scale": sx, "bits": self.act_bits}, meta, before=node).outputs[0]
            yq = graph.make_node(
                "qdense", [xq, c_w, c_b, c_m, c_s], [TensorType(act, out.type.shape)],
                {"shift": shift, "bits": self.act_bits, "x_scale": sx, "y_scale": sy}, meta, before=node,
            ).outputs[0]
            y = graph.make_node("dequantize", [yq], [out.type], {"scale": sy}, meta, before=node).outputs[0]
            replace_result(graph, out, y)
            graph.erase_node(node)
            done += 1
        dead = [n for n, v in graph.constants.items() if not v.users]
        for n in dead:
            del graph.constants[n]
        return {"quantized": done}
