"""The textual form of the IR: prints, and parses back to an identical graph.

    graph @encoder(%input_features: f32[1, 80, 3000]) {
      %encoder.conv1.weight = const f32[384, 80, 3]
      %val_0 = const f32[] dense<1.4142135381698608>
      %conv1d = conv(%input_features, %encoder.conv1.weight, %encoder.conv1.bias) {pads = [1, 1]} : f32[1, 384, 3000] loc("encoder.conv1", "node_conv1d")
      return %conv1d
    }

* Types are ``dtype[dim, ...]``; a dim is an integer, a symbolic sum (``P + T``) or ``?``; a
  constant weight's storage encoding follows in angle brackets: ``i8[384, 1536]<pencil8>``.
* Small constants (at most 16 elements) print their data inline as ``dense<...>``; larger ones
  print only their type, and their data lives beside the text in a safetensors file
  (:func:`save` / :func:`load`). Constant annotations (sparse encoding, quantization) print as an
  attribute dict after the type.
* Attribute values: ints, floats (always with ``.``, ``e``, ``inf`` or ``nan``), strings, ``true`` /
  ``false``, lists ``[...]`` and dicts ``{key = value}``.
* ``loc(scope, source)``: the module path a node came from and its ONNX node name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from femtocc.cache import atomic_write
from femtocc.errors import FemtoccError
from femtocc.ir import dims
from femtocc.ir.core import DTYPES, Graph, Node, TensorType, Value
from femtocc.ir.formats import parse_format

INLINE_LIMIT = 16
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class IRParseError(FemtoccError):
    pass


# ----------------------------------------------------------------------------- printing


def _name(v: Value) -> str:
    return "%" + (v.name if _PLAIN_NAME.match(v.name) else json.dumps(v.name))


def _scalar(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        f = float(x)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if isinstance(x, str):
        return json.dumps(x)
    raise TypeError(f"attribute value {x!r} of type {type(x).__name__} has no text form")


def print_value(x) -> str:
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k} = {print_value(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(print_value(v) for v in x) + "]"
    return _scalar(x)


def _attrs(attrs: dict) -> str:
    return f" {print_value(attrs)}" if attrs else ""


def print_graph(g: Graph) -> str:
    lines = [f"graph @{g.name}({', '.join(f'{_name(v)}: {v.type}' for v in g.inputs)}) {{"]
    for v in g.constants.values():
        line = f"  {_name(v)} = const {v.type}"
        if v.data is not None and v.data.size <= INLINE_LIMIT:
            flat = [_scalar(x) for x in v.data.reshape(-1).tolist()]
            body = flat[0] if v.data.ndim == 0 else "[" + ", ".join(flat) + "]"
            line += f" dense<{body}>"
        lines.append(line + _attrs(v.attrs))
    for node in g.nodes:
        outs = ", ".join(_name(v) for v in node.outputs)
        ins = ", ".join(_name(v) for v in node.inputs)
        types = ", ".join(str(v.type) for v in node.outputs)
        line = f"  {outs} = {node.op}({ins}){_attrs(node.attrs)} : {types}"
        if node.meta:
            line += f" loc({json.dumps(node.meta.get('scope', ''))}, {json.dumps(node.meta.get('source', ''))})"
        lines.append(line)
    lines.append(f"  return {', '.join(_name(v) for v in g.outputs)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parsing

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t]+|\#[^\n]*)
  | (?P<nl>\n)
  | (?P<value>%(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_.]+))
  | (?P<global>@[A-Za-z0-9_.][A-Za-z0-9_.@]*)  # @encoder, @encoder@10s (a context bucket)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:inf|nan|\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+))
  | (?P<arrow>->)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[()\[\]{}<>,=:?+\-])
    """,
    re.VERBOSE,
)


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.tokens: list[tuple[str, str, int, int]] = []
        line, line_start = 1, 0
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                self._fail_at(line, pos - line_start + 1, f"unexpected character {text[pos]!r}")
            kind = m.lastgroup
            if kind == "nl":
                line, line_start = line + 1, m.end()
            elif kind != "ws":
                self.tokens.append((kind, m.group(), line, pos - line_start + 1))
            pos = m.end()
        self.tokens.append(("eof", "", line, 1))
        self.i = 0

    def _fail_at(self, line, col, msg):
        raise IRParseError(f"{self.source}:{line}:{col}: {msg}")

    def fail(self, msg):
        _, text, line, col = self.tokens[self.i]
        self._fail_at(line, col, f"{msg} (found {text!r})" if text else f"{msg} (found end of input)")

    def peek(self, text: str | None = None, kind: str | None = None) -> bool:
        k, t, _, _ = self.tokens[self.i]
        return (text is None or t == text) and (kind is None or k == kind)

    def next(self, text: str | None = None, kind: str | None = None, what: str | None = None) -> str:
        if not self.peek(text, kind):
            self.fail(f"expected {what or text or kind}")
        tok = self.tokens[self.i][1]
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        if self.peek(text):
            self.i += 1
            return True
        return False

    # values and types
    def value_name(self) -> str:
        tok = self.next(kind="value", what="a %value")[1:]
        return json.loads(tok) if tok.startswith('"') else tok

    def tensor_type(self) -> TensorType:
        dtype = self.next(kind="ident", what="a dtype")
        if dtype not in DTYPES:
            self.i -= 1
            self.fail(f"unknown dtype; expected one of {', '.join(DTYPES)}")
        self.next("[")
        shape: list[int | str] = []
        while not self.peek("]"):
            expr = []
            while not (self.peek(",") or self.peek("]")):
                expr.append(self.next(what="a dimension"))
            if not expr:
                self.fail("expected a dimension")
            text = " ".join(expr)
            if re.fullmatch(r"-?\d+", text):
                shape.append(int(text))
            else:
                d = dims.canonical(text)
                if d == dims.UNKNOWN and text != "?":
                    self.fail(f"bad dimension {text!r}")
                shape.append(d)
            if not self.accept(","):
                break
        self.next("]")
        encoding = None
        if self.accept("<"):
            parts = []
            while not self.peek(">"):
                parts.append(self.next(what="a storage format"))
            self.next(">")
            try:
                encoding = parse_format("".join(parts)).name
            except FemtoccError as e:
                self.i -= 1
                self.fail(str(e))
        return TensorType(dtype, tuple(shape), encoding)

    def attr_value(self):
        if self.accept("["):
            items = []
            while not self.peek("]"):
                items.append(self.attr_value())
                if not self.accept(","):
                    break
            self.next("]")
            return items
        if self.peek("{"):
            return self.attr_dict()
        kind, tok, _, _ = self.tokens[self.i]
        self.i += 1
        if kind == "string":
            return json.loads(tok)
        if kind == "number":
            if re.fullmatch(r"-?\d+", tok):
                return int(tok)
            return float(tok)
        if kind == "ident" and tok in ("true", "false"):
            return tok == "true"
        self.i -= 1
        self.fail("expected an attribute value")

    def attr_dict(self) -> dict:
        self.next("{")
        out = {}
        while not self.peek("}"):
            key = self.next(kind="ident", what="an attribute name")
            self.next("=")
            out[key] = self.attr_value()
            if not self.accept(","):
                break
        self.next("}")
        return out

    def parse(self, weights: dict[str, np.ndarray] | None) -> Graph:
        self.next("graph")
        name = self.next(kind="global", what="@name")[1:]
        g = Graph(name)
        env: dict[str, Value] = {}

        def define(v: Value):
            if v.name in env:
                self.fail(f"value %{v.name} is defined twice")
            env[v.name] = v

        def use(name: str) -> Value:
            if name not in env:
                self.i -= 1
                self.fail(f"use of undefined value %{name}")
            return env[name]

        self.next("(")
        while not self.peek(")"):
            vname = self.value_name()
            self.next(":")
            define(g.add_input(vname, self.tensor_type()))
            if not self.accept(","):
                break
        self.next(")")
        self.next("{")
        while not self.peek("return"):
            names = [self.value_name()]
            while self.accept(","):
                names.append(self.value_name())
            self.next("=")
            if self.accept("const"):
                ty = self.tensor_type()
                data = None
                if self.accept("dense"):
                    data = self._dense(ty)
                elif weights is not None and names[0] in weights:
                    data = np.asarray(weights[names[0]])
                    if not TensorType.of(data).same_data(ty):
                        self.fail(f"weight {names[0]} has type {TensorType.of(data)}, text says {ty}")
                attrs = self.attr_dict() if self.peek("{") else {}
                v = Value(names[0], ty, data=data, attrs=attrs)
                define(v)
                g.constants[v.name] = v
                continue
            op = self.next(kind="ident", what="an op name")
            self.next("(")
            ins = []
            while not self.peek(")"):
                ins.append(use(self.value_name()))
                if not self.accept(","):
                    break
            self.next(")")
            attrs = self.attr_dict() if self.peek("{") else {}
            self.next(":")
            types = [self.tensor_type()]
            while self.accept(","):
                types.append(self.tensor_type())
            if len(types) != len(names):
                self.fail(f"{len(names)} results but {len(types)} types")
            meta = {}
            if self.accept("loc"):
                self.next("(")
                scope = json.loads(self.next(kind="string", what="a scope string"))
                self.next(",")
                source = json.loads(self.next(kind="string", what="a source string"))
                self.next(")")
                meta = {k: v for k, v in (("scope", scope), ("source", source)) if v}
            outs = [Value(n, t) for n, t in zip(names, types)]
            for v in outs:
                define(v)
            g.nodes.append(Node(op, ins, outs, attrs, meta))
        self.next("return")
        g.outputs = [use(self.value_name())]
        while self.accept(","):
            g.outputs.append(use(self.value_name()))
        self.next("}")
        self.next(kind="eof", what="end of input")
        return g

    def _dense(self, ty: TensorType) -> np.ndarray:
        self.next("<")
        values = self.attr_value()
        self.next(">")
        flat = values if isinstance(values, list) else [values]
        if not ty.is_static or len(flat) != ty.numel():
            self.fail(f"dense literal has {len(flat)} values, type {ty} needs {ty.numel()}")
        return np.array(flat, dtype=DTYPES[ty.dtype]).reshape(ty.shape)


def parse_graph(text: str, weights: dict[str, np.ndarray] | None = None, source: str = "<text>") -> Graph:
    return _Parser(text, source).parse(weights)


# ----------------------------------------------------------------------------- files


def weights_path(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def save(g: Graph, path: str | Path) -> Path:
    """Write ``path`` (text) and, for large constants, ``path`` with suffix ``.safetensors``."""
    from safetensors.numpy import save as st_save

    path = Path(path)
    big = {n: np.ascontiguousarray(v.data) for n, v in g.constants.items() if v.data is not None and v.data.size > INLINE_LIMIT}
    with atomic_write(weights_path(path)) as f:
        f.write(st_save(dict(sorted(big.items()))))
    with atomic_write(path, "w") as f:
        f.write(print_graph(g))
    return path


def load(path: str | Path) -> Graph:
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FemtoccError(f"{path}: no such IR file")
    wfile = weights_path(path)
    weights = None
    if wfile.is_file():
        try:
            weights = load_file(str(wfile))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise FemtoccError(f"{wfile}: unreadable weights file ({e})") from None
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise FemtoccError(f"{path}: not an IR text file (not UTF-8)") from None
    return parse_graph(text, weights, str(path))
