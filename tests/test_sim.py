"""The C cycle simulator: bit-exact with the reference runtime, robust to corrupt programs, sane statistics."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from femtocc.runtime.program import Program, ProgramError
from femtocc.runtime.reference import ReferenceRuntime
from femtocc.runtime.sim import SimRuntime, sim_config
from femtocc.targets.spu001 import load
from test_program import compiled

TARGET = load()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return compiled(tmp_path_factory.mktemp("toy"))


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 16), (4, 8)])
def test_bit_exact_with_the_reference_runtime(tmp_path, weight_bits, act_bits):
    g, feeds, data = compiled(tmp_path, weight_bits=weight_bits, act_bits=act_bits)
    ref = ReferenceRuntime(Program.from_bytes(data)).runner()(feeds)["out"]
    sim = SimRuntime(data, TARGET)
    assert np.array_equal(sim.runner()(feeds)["out"], ref)
    for t in (1, 3, 9):  # other bindings of T
        x = np.random.default_rng(t).integers(-30000, 30000, (1, t, 32)).astype(np.int16 if act_bits == 16 else np.int8)
        assert np.array_equal(sim.run({"x": x})[0]["out"], ReferenceRuntime(Program.from_bytes(data)).run({"x": x})["out"])


def test_statistics(toy):
    _, feeds, data = toy
    sim = SimRuntime(data, TARGET)
    sink = []
    sim.runner(sink)(feeds)
    (stats,) = sink
    ops = stats.by_op()
    assert set(ops) >= {"qdense", "qmatmul", "qsoftmax", "qlayer_norm", "qgelu"}
    assert ops["qdense"]["macs"] > 0 and stats.total("cycles") >= stats.total("compute_cycles")
    assert stats.energy_pj() > 0
    # the pencil8 layer issues only its kept pencils' MACs
    fc1 = next(r for (op, _, w, _), r in zip(stats.instructions, stats.rows) if w == "w1.q")
    w1 = Program.from_bytes(data).buffers
    assert fc1["macs"] + fc1["macs_skipped"] < 6 * 32 * 64 * 0.5
    # twice the MAC lanes: fewer compute cycles
    fast = dict(sim_config(TARGET), mac_lanes_per_core=16)
    from femtocc.runtime.sim import extension

    _, rows = extension().Simulator(data, fast).run([(1, (1, 6, 32), np.zeros((1, 6, 32), np.int16))])
    assert sum(r[1] for r in rows) < stats.total("compute_cycles") and w1


@pytest.mark.parametrize("low, high", [(0, 2 ** 31 - 1), (2 ** 31 - 64, 2 ** 31 - 1), (0, 3)])
def test_table_ops_at_extreme_table_values(toy, low, high):
    """Exp and GELU tables of any int32 values (numerators near 2**46, sums near 2**36, rows that
    saturate): the simulator's vectorised softmax and GELU still match the reference to the bit."""
    _, _, data = toy
    prog = Program.from_bytes(data)
    rng = np.random.default_rng(low + high)
    for ins in prog.code:
        if ins.op in ("qsoftmax", "qgelu"):
            buf = prog.buffers[ins.inputs[1]]
            buf.blob = rng.integers(low, high + 1, len(buf.blob) // 4).astype("<i4").tobytes()
    mutated = prog.to_bytes()
    for t in (1, 4, 9):
        x = {"x": rng.integers(-30000, 30000, (1, t, 32)).astype(np.int16)}
        want = ReferenceRuntime(Program.from_bytes(mutated)).run(x)["out"]
        assert np.array_equal(SimRuntime(mutated, TARGET).run(x)[0]["out"], want)


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 16), (4, 8)])
def test_wide_layers_through_every_dense_kernel(weight_bits, act_bits):
    """Inner sizes past the kernels' int32 runs (more than 256 pencils in a group, 128 weight pairs), odd
    pencil counts, a column count that is not a multiple of 32, and blocks of 8, 4 and 1 rows: the
    simulator's dense and pencil kernels match the reference to the bit."""
    from femtocc.ir import Graph, TensorType
    from femtocc.passes import PassManager, pipeline
    from femtocc.passes.calibrate import RangeRecorder, attach_ranges
    from femtocc.targets.spu001.codegen import generate

    rng = np.random.default_rng(3)
    g = Graph("wide")
    x = g.add_input("x", TensorType("f32", (1, "T", 700)))
    w1 = rng.standard_normal((700, 64)).astype(np.float32)
    w1.reshape(700, 8, 8)[rng.random((700, 8)) < 0.45] = 0  # pencils: about 385 per group, some odd
    h = g.make_node("dense", [x, g.add_constant("w1", w1)], [TensorType("f32", (1, "T", 64))], meta={"scope": "fc1"}).outputs[0]
    w2 = rng.standard_normal((64, 72)).astype(np.float32)
    g.outputs = [g.make_node("dense", [h, g.add_constant("w2", w2)], [TensorType("f32", (1, "T", 72))], names=["out"],
                             meta={"scope": "fc2"}).outputs[0]]
    feeds = {"x": rng.standard_normal((1, 13, 700)).astype(np.float32)}
    recorder = RangeRecorder()
    recorder.runner(g)(feeds)
    attach_ranges({"wide": g}, recorder.ranges)
    PassManager.parse(pipeline("spu001", weight_bits=weight_bits, act_bits=act_bits, tokens=13)).run(g)
    data = generate(g, TARGET).to_bytes()
    assert [b.layout for b in Program.from_bytes(data).buffers if b.name == "w1.q"] == ["pencil"]
    for t in (13, 8, 5, 1):
        q = np.iinfo(np.int16 if act_bits == 16 else np.int8).max
        x = {"x": rng.integers(-q, q + 1, (1, t, 700)).astype(np.int16 if act_bits == 16 else np.int8)}
        x["x"][0, 0, :] = -q - 1  # the most negative input everywhere in one row
        want = ReferenceRuntime(Program.from_bytes(data)).run(x)["out"]
        assert np.array_equal(SimRuntime(data, TARGET).run(x)[0]["out"], want)


def test_bad_inputs_and_config(toy):
    _, _, data = toy
    sim = SimRuntime(data, TARGET)
    with pytest.raises(ProgramError, match="input x was not given"):
        sim.run({})
    with pytest.raises(ProgramError, match="input x is float32"):
        sim.run({"x": np.zeros((1, 2, 32), np.float32)})
    with pytest.raises(ProgramError, match="does not fit|has dim"):
        sim.run({"x": np.zeros((1, 2, 31), np.int16)})
    from femtocc.runtime.sim import extension

    cfg = sim_config(TARGET)
    del cfg["cores"]
    with pytest.raises(ValueError, match="missing cores"):
        extension().Simulator(data, cfg)


def reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupt_and_truncated_programs_raise(toy):
    _, _, data = toy
    with pytest.raises(ProgramError, match="checksum mismatch"):
        SimRuntime(data[:-1] + bytes([data[-1] ^ 1]), TARGET)
    for cut in range(0, len(data) - 4, max(1, len(data) // 200)):
        with pytest.raises(ProgramError):
            SimRuntime(reseal(data[:cut]), TARGET)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_programs_never_crash(toy, data):
    """Random byte mutations (checksum resealed, so they reach the parser): either rejected with a
    clear error, or valid and then run (or rejected at run time) without crashing."""
    _, _, program = toy
    body = bytearray(program[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    mutated = reseal(bytes(body))
    try:
        sim = SimRuntime(mutated, TARGET)
    except ProgramError as e:
        assert str(e)
        return
    x = np.random.default_rng(0).integers(-100, 100, (1, 4, 32)).astype(np.int16)
    try:
        sim.run({"x": x})
    except ProgramError as e:
        assert str(e)


def test_analytical_counter_agrees_with_the_simulator(tmp_path):
    """targets/spu001/cost.py, from the IR alone, against the simulator with zero skipping off."""
    from femtocc.runtime.sim import extension
    from femtocc.targets.spu001.codegen import generate
    from femtocc.targets.spu001.cost import linear_layer_costs
    from test_program import block

    g, _ = block(tmp_path)
    sim = extension().Simulator(generate(g, TARGET).to_bytes(), dict(sim_config(TARGET), skip_zero_activations=0))
    x = np.random.default_rng(0).integers(-300, 300, (1, 6, 32)).astype(np.int16)
    _, rows = sim.run([(1, (1, 6, 32), x)])
    fields = extension().STAT_FIELDS
    predicted = linear_layer_costs(g, TARGET, tokens=6)
    measured = {w: dict(zip(fields, r)) for (op, _, w, _), r in zip(sim.instructions, rows) if op == "qdense"}
    assert set(measured) == set(predicted) == {"w1.q", "w2.q"}
    for name, p in predicted.items():
        for key in ("macs", "sram_read_words", "sram_write_words", "cycles"):
            assert abs(measured[name][key] - p[key]) <= 0.08 * p[key], (name, key)


def test_sram_traffic_per_bank(toy):
    _, feeds, data = toy
    sink = []
    SimRuntime(data, TARGET).runner(sink)(feeds)
    reads, writes = sink[0].per_bank("bank_reads"), sink[0].per_bank("bank_writes")
    assert len(reads) == len(writes) == TARGET.facts.sram_banks_per_core
    assert sum(reads) > 0 and sum(writes) > 0


def test_a_dim_t_plus_p_binds_p_once_t_is_known(tmp_path):
    """Inputs [T, 16] and [P + T, 16] only (no dim of P alone): both runtimes bind P from the second."""
    import json

    from femtocc.ir import Graph, TensorType
    from femtocc.passes import PassManager
    from femtocc.passes.calibrate import RangeRecorder
    from femtocc.targets.spu001.codegen import generate

    g = Graph("cached_attention")
    q = g.add_input("q", TensorType("f32", (1, "T", 16)))
    k = g.add_input("k", TensorType("f32", (1, "P + T", 16)))
    kt = g.make_node("transpose", [k], [TensorType("f32", (1, 16, "P + T"))], {"perm": [0, 2, 1]}).outputs[0]
    s = g.make_node("matmul", [q, kt], [TensorType("f32", (1, "T", "P + T"))]).outputs[0]
    p = g.make_node("softmax", [s], [TensorType("f32", (1, "T", "P + T"))], {"axis": -1}).outputs[0]
    g.outputs = [g.make_node("matmul", [p, k], [TensorType("f32", (1, "T", 16))], names=["out"]).outputs[0]]
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 2, 16)).astype(np.float32), "k": rng.standard_normal((1, 5, 16)).astype(np.float32)}
    recorder = RangeRecorder()
    recorder.runner(g)(feeds)
    (tmp_path / "r.json").write_text(json.dumps(recorder.ranges))
    PassManager.parse(f"quantize{{ranges={tmp_path / 'r.json'}}},select-layout,tile-sram{{tokens=2,cached=3}}").run(g)
    data = generate(g, TARGET).to_bytes()
    reference = ReferenceRuntime(Program.from_bytes(data))
    assert reference.bind({"q": np.zeros((1, 2, 16), np.int16), "k": np.zeros((1, 5, 16), np.int16)}) == {"T": 2, "P": 3}
    for t, keys in ((2, 5), (1, 7), (3, 3)):
        ints = {"q": rng.integers(-9000, 9000, (1, t, 16)).astype(np.int16), "k": rng.integers(-9000, 9000, (1, keys, 16)).astype(np.int16)}
        ref = reference.run(ints)["out"]
        assert ref.shape == (1, t, 16)
        assert np.array_equal(SimRuntime(data, TARGET).run(ints)[0]["out"], ref)
    with pytest.raises(ProgramError, match="does not fit"):
        reference.run({"q": np.zeros((1, 4, 16), np.int16), "k": np.zeros((1, 3, 16), np.int16)})
    with pytest.raises(ProgramError, match="does not fit"):
        SimRuntime(data, TARGET).run({"q": np.zeros((1, 4, 16), np.int16), "k": np.zeros((1, 3, 16), np.int16)})


REGRESSIONS = sorted((Path(__file__).parent / "fuzz" / "regressions").glob("*.spu-body"))


def _run_both(program: bytes, feeds):
    """(reference outputs or its error, simulator outputs or its error)."""
    results = []
    for run in (lambda: ReferenceRuntime(Program.from_bytes(program)).run(feeds),
                lambda: SimRuntime(program, TARGET).run(feeds)[0]):
        try:
            results.append(run())
        except ProgramError as e:
            assert str(e)
            results.append(e)
    return results


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.stem)
def test_fuzzer_findings(path):
    """Every input the libFuzzer harness (tests/fuzz/spu_fuzz.c) ever crashed on: both validators
    agree on it, and where both accept it, the two runtimes give the same outputs or both refuse."""
    program = reseal(path.read_bytes())
    verdicts = []
    for validate in (Program.from_bytes, lambda b: SimRuntime(b, TARGET)):
        try:
            validate(program)
            verdicts.append(None)
        except ProgramError as e:
            verdicts.append(str(e).split(": ", 1)[1])
    assert (verdicts[0] is None) == (verdicts[1] is None), verdicts
    if verdicts[0] is None:
        x = np.random.default_rng(0).integers(-100, 100, (1, 3, 32)).astype(np.int16)
        ref, sim = _run_both(program, {"x": x})
        assert isinstance(ref, ProgramError) == isinstance(sim, ProgramError)
        if not isinstance(ref, ProgramError):
            assert all(np.array_equal(ref[k], sim[k]) for k in ref)


def test_a_sparse_constant_too_large_to_decode_is_refused_before_allocation():
    """The fuzzer's first finding: a pencil8 weight declaring 33,554,464 x 64 inputs behind 612 bytes
    made the simulator allocate 16 GiB (the Python loader accepted it too)."""
    program = reseal((Path(__file__).parent / "fuzz" / "regressions" / "oom-constant-shape-unbacked.spu-body").read_bytes())
    with pytest.raises(ProgramError, match=r"w1.q has more than 2\*\*28 elements"):
        Program.from_bytes(program)
    with pytest.raises(ProgramError, match=r"w1.q.*more than 2\*\*28 elements"):
        SimRuntime(program, TARGET)


def test_a_gather_reads_only_the_rows_it_looks_up(tmp_path):
    """A token-embedding gather reads one row (and its multiplier) per looked-up token, not the whole
    table at every decoder step (the compiled decoder's table streams from external memory; this one
    is a constant, and the same rule counts its SRAM words)."""
    import json

    from femtocc.ir import Graph, TensorType
    from femtocc.passes import PassManager
    from femtocc.passes.calibrate import RangeRecorder
    from femtocc.targets.spu001.codegen import generate

    rows, dim = 4096, 384
    g = Graph("embed")
    ids = g.add_input("ids", TensorType("i64", (1, "T")))
    table = g.add_constant("table", np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32))
    g.outputs = [g.make_node("gather", [table, ids], [TensorType("f32", (1, "T", dim))], {"axis": 0}, names=["out"]).outputs[0]]
    recorder = RangeRecorder()
    recorder.runner(g)({"ids": np.array([[1, 2, 3]])})
    (tmp_path / "r.json").write_text(json.dumps(recorder.ranges))
    PassManager.parse(f"quantize{{ranges={tmp_path / 'r.json'}}},select-layout,tile-sram{{tokens=3}}").run(g)
    data = generate(g, TARGET).to_bytes()
    program = Program.from_bytes(data)
    moved = {}
    for t in (1, 3):
        token_ids = np.arange(5, 5 + t, dtype=np.int64)[None]
        out, stats = SimRuntime(data, TARGET).run({"ids": token_ids})
        assert np.array_equal(out["out"], ReferenceRuntime(program).run({"ids": token_ids})["out"])
        (row,) = [r for (op, *_), r in zip(stats.instructions, stats.rows) if op == "qgather"]
        moved[t] = row["sram_read_words"]
    word = TARGET.facts.sram_word_bits // 8
    assert moved[3] < dim * rows / word / 100 and moved[3] > moved[1] >= dim / word
