"""femtocc's graph IR: core data structures, op vocabulary, text form, verifier, interpreter."""

from femtocc.ir.core import Graph, Node, TensorType, Value
from femtocc.ir.interpreter import Interpreter
from femtocc.ir.text import load, parse_graph, print_graph, save
from femtocc.ir.verify import VerifyError, infer_shapes, verify

__all__ = [
    "Graph", "Node", "TensorType", "Value", "Interpreter", "load", "parse_graph", "print_graph",
    "save", "VerifyError", "infer_shapes", "verify",
]
