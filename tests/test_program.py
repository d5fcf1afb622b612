"""The .spu program: codegen, round trip, disassembly, determinism, corruption, reference runtime."""

import struct
import zlib

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.ir import Graph, Interpreter, TensorType
from femtocc.passes import PassManager, pipeline
from femtocc.passes.calibrate import RangeRecorder, attach_ranges
from femtocc.runtime.program import Buffer, Program, ProgramError, decode_constant, encode_constant
from femtocc.runtime.reference import ReferenceRuntime
from femtocc.targets.spu001 import DEFAULT, load
from femtocc.targets.spu001.codegen import generate

rng = np.random.default_rng(7)


def block(tmp_path, weight_bits=8, act_bits=16, pencil=8, target=""):
    """layer_norm -> dense (pruned in pencils of ``pencil``) -> gelu -> dense, plus a self-attention over
    rows: quantized, laid out and tiled for ``target`` (a description file; empty: spu001). Returns
    (graph, float feeds); the same every call."""
    rng = np.random.default_rng(7)
    g = Graph("block")
    x = g.add_input("x", TensorType("f32", (1, "T", 32)))
    f32 = lambda *s: TensorType("f32", s)  # noqa: E731
    ln = g.make_node("layer_norm", [x, g.add_constant("gamma", rng.uniform(0.5, 1.5, 32).astype(np.float32)),
                                    g.add_constant("beta", rng.standard_normal(32).astype(np.float32))],
                     [f32(1, "T", 32)], {"axis": -1, "epsilon": 1e-5}).outputs[0]
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    w1.reshape(32, 64 // pencil, pencil)[rng.random((32, 64 // pencil)) < 0.7] = 0  # 70 % of pencils zero: pencils win
    h = g.make_node("dense", [ln, g.add_constant("w1", w1), g.add_constant("b1", rng.standard_normal(64).astype(np.float32))],
                    [f32(1, "T", 64)], meta={"scope": "fc1"}).outputs[0]
    h = g.make_node("gelu", [h], [f32(1, "T", 64)]).outputs[0]
    y = g.make_node("dense", [h, g.add_constant("w2", rng.standard_normal((64, 32)).astype(np.float32))],
                    [f32(1, "T", 32)], meta={"scope": "fc2"}).outputs[0]
    kt = g.make_node("transpose", [y], [f32(1, 32, "T")], {"perm": [0, 2, 1]}).outputs[0]
    s = g.make_node("matmul", [y, kt], [f32(1, "T", "T")]).outputs[0]
    p = g.make_node("softmax", [s], [f32(1, "T", "T")], {"axis": -1}).outputs[0]
    a = g.make_node("matmul", [p, y], [f32(1, "T", 32)]).outputs[0]
    out = g.make_node("add", [a, x], [f32(1, "T", 32)], names=["out"]).outputs[0]
    g.outputs = [out]
    feeds = {"x": rng.standard_normal((1, 6, 32)).astype(np.float32)}
    recorder = RangeRecorder()
    recorder.runner(g)(feeds)
    attach_ranges({"block": g}, recorder.ranges)
    PassManager.parse(pipeline("spu001", target=target, weight_bits=weight_bits, act_bits=act_bits, tokens=6)).run(g)
    return g, feeds


def compiled(tmp_path, **kw):
    g, feeds = block(tmp_path, **kw)
    return g, feeds, generate(g, load(kw.get("target") or DEFAULT)).to_bytes()


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 16), (4, 8)])
def test_reference_runtime_matches_the_integer_ir(tmp_path, weight_bits, act_bits):
    g, feeds, data = compiled(tmp_path, weight_bits=weight_bits, act_bits=act_bits)
    prog = Program.from_bytes(data)
    assert [(b.layout, b.block) for b in prog.buffers if b.name == "w1.q"] == [("pencil", 8)]
    assert any(i.tile_rows for i in prog.code if i.op == "qsoftmax")  # the attention chain was row-tiled
    runner = ReferenceRuntime(prog).runner()
    expected = Interpreter(g).run(feeds)["out"]
    assert np.array_equal(runner(feeds)["out"], expected)  # bit-exact, through pencil decoding and int4 packing
    # integer I/O with the symbol scales
    (sym,) = prog.inputs
    xq = np.clip(np.rint(feeds["x"] / np.float32(sym.scale)), -32767, 32767).astype(np.int16 if act_bits == 16 else np.int8)
    out = ReferenceRuntime(prog).run({"x": xq})["out"]
    assert out.dtype == (np.int16 if act_bits == 16 else np.int8) and out.shape == (1, 6, 32)


def test_round_trip_disassembly_and_determinism(tmp_path):
    g, feeds, data = compiled(tmp_path)
    prog = Program.from_bytes(data)
    assert prog.to_bytes() == data  # read and write back: same bytes
    assert compiled(tmp_path)[2] == data  # compile again: same bytes
    text = prog.disassemble()
    assert "qdense" in text and "pencil8/8b" in text and "input  x = b0 scale=" in text and "output out" in text
    assert text.count("\n  ") >= len(prog.code)


def test_corrupt_programs_are_rejected_with_clear_errors(tmp_path):
    data = compiled(tmp_path)[2]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    with pytest.raises(ProgramError, match="checksum mismatch"):
        Program.from_bytes(bytes(flipped), "p.spu")
    with pytest.raises(ProgramError, match="checksum mismatch|too short"):
        Program.from_bytes(data[:100], "p.spu")

    def resealed(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    body = bytearray(data[:-4])
    body[0:4] = b"ELF\0"
    with pytest.raises(ProgramError, match="not a .spu program"):
        Program.from_bytes(resealed(bytes(body)), "p.spu")
    prog = Program.from_bytes(data)
    prog.code[0].inputs[0] = 999
    with pytest.raises(ProgramError, match=r"instruction 0 \(.*\): operand buffer 999 does not exist"):
        Program.from_bytes(prog.to_bytes(), "p.spu")
    prog = Program.from_bytes(data)
    prog.code[2].params = prog.code[2].params[:-1]
    with pytest.raises(ProgramError, match="instruction 2 .*params"):
        Program.from_bytes(prog.to_bytes(), "p.spu")
    prog = Program.from_bytes(data)
    big = next(b for b in prog.buffers if b.region == "sram")
    big.address = prog.sram_bytes_per_core
    with pytest.raises(ProgramError, match="exceeds the 524288 bytes per core"):
        Program.from_bytes(prog.to_bytes(), "p.spu")
    # truncating or extending any section is caught, never a crash
    for cut in range(0, len(data) - 4, max(1, len(data) // 97)):
        with pytest.raises(ProgramError):
            Program.from_bytes(resealed(data[:cut]), "p.spu")


def test_runtime_checks_inputs(tmp_path):
    prog = Program.from_bytes(compiled(tmp_path)[2])
    rt = ReferenceRuntime(prog)
    with pytest.raises(ProgramError, match="input x was not given"):
        rt.run({})
    with pytest.raises(ProgramError, match="input x is float32"):
        rt.run({"x": np.zeros((1, 6, 32), np.float32)})
    with pytest.raises(ProgramError, match="has shape"):
        rt.run({"x": np.zeros((1, 6, 31), np.int16)})


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_layouts_round_trip(bits):
    q = rng.integers(-7 if bits == 4 else -127, 8 if bits == 4 else 128, (40, 24)).astype(np.int8)
    q.reshape(40, 3, 8)[rng.random((40, 3)) < 0.6] = 0
    for layout, block in (("dense", 0), ("pencil", 8), ("pencil", 4), ("pencil", 24)):
        blob = encode_constant(q, layout, bits, block)
        b = Buffer("w", "i8", ((40, 0, 0), (24, 0, 0)), "const", nbytes=len(blob), layout=layout, bits=bits, block=block,
                   blob=blob)
        assert np.array_equal(decode_constant(b), q)
    pencils = int(q.reshape(40, 3, 8).any(axis=2).sum())
    assert len(encode_constant(q, "pencil", bits, 8)) == 4 * 4 + pencils * (2 + 8 * bits // 8)


def test_codegen_rejects_float_graphs():
    g = Graph("f")
    x = g.add_input("x", TensorType("f32", (2, 3)))
    g.outputs = [g.make_node("gelu", [x], [TensorType("f32", (2, 3))]).outputs[0]]
    with pytest.raises(FemtoccError, match="float input %x of @f must be read through one quantize"):
        generate(g, load())
