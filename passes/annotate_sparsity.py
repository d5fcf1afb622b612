"""annotate-sparsity: record the sparsity pattern of each weight's zeros on its constant (an analysis).

For every ``dense`` and ``conv`` node with a constant weight that has zeros, the constant gets
``attrs["sparsity"] = {format, nnz, sparsity[, pencils]}`` where format is the most structured
pattern the zeros follow: ``pencil{pencil}`` (whole pencils of that many output channels), then
``2:4``/``1:4``/``4:8``, then ``unstructured`` (see :func:`femtocc.passes.sparsity.describe`).
Dense weights get no annotation. The data and the types are not changed: this is what reports and
readers of the IR see; the storage format a target uses is a type encoding that its layout pass
chooses from the data (``select-layout``), not from this annotation.
"""

from __future__ import annotations

from femtocc.passes.manager import Pass, register
from femtocc.passes.sparsity import describe


def weight_out_in(node):
    """The node's weight constant and its data as [out, in], or (None, None)."""
    if node.op == "dense" and node.inputs[1].is_constant:
        w = node.inputs[1]
        return w, w.data.T
    if node.op == "conv" and node.inputs[1].is_constant:
        w = node.inputs[1]
        return w, w.data.reshape(w.data.shape[0], -1)
    return None, None


@register
class AnnotateSparsity(Pass):
    name = "annotate-sparsity"
    pencil: int = 8  # the pencil height to look for

    def run(self, graph):
        annotated = 0
        for node in graph.nodes:
            const, matrix = weight_out_in(node)
            if const is None:
                continue
            encoding = describe(matrix, self.pencil)
            if encoding["format"] == "dense":
                const.attrs.pop("sparsity", None)
                continue
            const.attrs["sparsity"] = encoding
            annotated += 1
        return {"annotated": annotated}
