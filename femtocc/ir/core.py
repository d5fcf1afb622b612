"""The femtocc graph IR: one ``Graph`` of ``Node`` s over typed SSA ``Value`` s.

* A ``Value`` has a name and a ``TensorType`` (dtype, shape and storage encoding; a dim is an int,
  a symbolic expression such as ``"T"`` or ``"P + T"``, or ``"?"`` when unknown). It is a graph
  input, the output of exactly one node, or a constant. A constant holds its numpy data; its type's
  ``encoding`` names the storage format of a weight (``pencil8``, ``2:4``; see
  :mod:`femtocc.ir.formats`; none: dense row-major), which the verifier checks against the data,
  so pruning changes data and encodings, never the op kind. ``attrs`` hold the rest of what passes
  record on a constant (quantization scales, the sparsity analysis, placement).
* A ``Node`` has an op name from the closed vocabulary in :mod:`femtocc.ir.ops`, input values,
  output values, attributes (int, float, str, bool, lists and dicts of those) and ``meta``
  (``scope``: the module path it came from; ``source``: the ONNX node name).
* Users are kept up to date: set inputs through :meth:`Node.set_input` or
  :meth:`Value.replace_all_uses_with`, never by assigning ``node.inputs`` directly.

Nodes are kept in a topological order; :func:`femtocc.ir.verify.verify` checks that.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

DTYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "f64": np.float64,
    "i64": np.int64,
    "i32": np.int32,
    "i16": np.int16,
    "i8": np.int8,
    "u8": np.uint8,
    "bool": np.bool_,
}
NUMPY_TO_DTYPE = {np.dtype(v): k for k, v in DTYPES.items()}

Dim = int | str


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]
    encoding: str | None = None  # storage format of a constant weight (femtocc.ir.formats); None: dense

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")

    def __str__(self) -> str:
        enc = f"<{self.encoding}>" if self.encoding else ""
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]{enc}"

    def with_encoding(self, encoding: str | None) -> TensorType:
        return TensorType(self.dtype, self.shape, encoding)

    def same_data(self, other: TensorType) -> bool:
        """Same dtype and shape, whatever the encodings."""
        return self.dtype == other.dtype and self.shape == other.shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int | None:
        return int(np.prod(self.shape)) if self.is_static else None

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        array = np.asarray(array)
        if array.dtype not in NUMPY_TO_DTYPE:
            raise ValueError(f"numpy dtype {array.dtype} has no IR dtype")
        return TensorType(NUMPY_TO_DTYPE[array.dtype], tuple(int(d) for d in array.shape))


class Value:
    __slots__ = ("name", "type", "producer", "users", "data", "attrs")

    def __init__(self, name: str, type: TensorType, producer: Node | None = None, data=None, attrs=None):
        self.name = name
        self.type = type
        self.producer = producer
        self.users: list[Node] = []
        self.data: np.ndarray | None = data
        self.attrs: dict = attrs if attrs is not None else {}

    @property
    def is_constant(self) -> bool:
        return self.producer is None and self.data is not None

    def replace_all_uses_with(self, new: Value) -> None:
        for user in list(self.users):
            for i, v in enumerate(user.inputs):
                if v is self:
                    user.set_input(i, new)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "meta")

    def __init__(self, op: str, inputs: list[Value], outputs: list[Value], attrs=None, meta=None):
        self.op = op
        self.inputs: list[Value] = []
        self.outputs = outputs
        self.attrs: dict = dict(attrs or {})
        self.meta: dict = dict(meta or {})
        for v in inputs:
            self.inputs.append(v)
            v.users.append(self)
        for v in outputs:
            v.producer = self

    def set_input(self, index: int, value: Value) -> None:
        old = self.inputs[index]
        old.users.remove(self)
        self.inputs[index] = value
        value.users.append(self)

    def drop_inputs(self) -> None:
        for v in self.inputs:
            v.users.remove(self)
        self.inputs = []

    def __repr__(self) -> str:
        return f"{self.op}({', '.join('%' + v.name for v in self.inputs)})"


@dataclass
class Graph:
    name: str
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    constants: dict[str, Value] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    # ------------------------------------------------------------------ naming
    def names(self) -> set[str]:
        taken = {v.name for v in self.inputs} | set(self.constants)
        for node in self.nodes:
            taken.update(v.name for v in node.outputs)
        return taken

    def fresh_name(self, hint: str, taken: set[str] | None = None) -> str:
        taken = self.names() if taken is None else taken
        if hint not in taken:
            return hint
        for i in itertools.count(1):
            if f"{hint}_{i}" not in taken:
                return f"{hint}_{i}"
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ building
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(name, type)
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, data: np.ndarray, attrs=None) -> Value:
        data = np.asarray(data)
        name = self.fresh_name(name)
        v = Value(name, TensorType.of(data), data=data, attrs=attrs)
        self.constants[name] = v
        return v

    def make_node(
        self, op: str, inputs: list[Value], out_types: list[TensorType], attrs=None, meta=None,
        names: list[str] | None = None, before: Node | None = None,
    ) -> Node:
        """Create a node with fresh output values; insert it before ``before`` or at the end."""
        taken = self.names()
        outs = []
        for i, t in enumerate(out_types):
            name = self.fresh_name(names[i] if names else op, taken)
            taken.add(name)
            outs.append(Value(name, t))
        node = Node(op, inputs, outs, attrs, meta)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def erase_node(self, node: Node) -> None:
        for v in node.outputs:
            if v.users or v in self.outputs:
                raise ValueError(f"cannot erase {node}: output %{v.name} is still used")
        node.drop_inputs()
        self.nodes.remove(node)

    def replace_output(self, old: Value, new: Value) -> None:
        self.outputs = [new if v is old else v for v in self.outputs]

    # ------------------------------------------------------------------ queries
    def values(self) -> dict[str, Value]:
        vals = {v.name: v for v in self.inputs}
        vals.update(self.constants)
        for node in self.nodes:
            vals.update((v.name, v) for v in node.outputs)
        return vals

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))

    def parameter_count(self) -> int:
        return int(sum(v.data.size for v in self.constants.values() if v.data is not None))

    def weights(self) -> dict[str, np.ndarray]:
        return {name: v.data for name, v in self.constants.items() if v.data is not None}

    def __str__(self) -> str:
        from femtocc.ir.text import print_graph

        return print_graph(self)
