from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from femtocc.errors import FemtoccError
from femtocc.runtime.program import ProgramError
from femtocc.targets.spu001 import DEFAULT, load


def test_default_description_has_the_public_facts():
    t = load()
    assert t.sram_bytes == 1 << 20 and t.sram_bytes_per_core == 512 * 1024
    assert t.facts.cores == 2 and t.facts.pencil == 8 and t.facts.clock_hz == 150_000_000
    assert t.facts.table_memory_bytes_per_core == 16 * 1024
    assert t.facts.program_memory_instructions_per_core == 4096
    assert t.peak_macs_per_second == 2 * 8 * 150e6


def test_a_larger_variant_is_only_another_description(tmp_path):
    text = DEFAULT.read_text().replace("cores = 2", "cores = 4").replace("sram_bank_words = 8192", "sram_bank_words = 16384")
    path = tmp_path / "spu004.toml"
    path.write_text(text)
    t = load(path)
    assert t.sram_bytes == 4 * 1024 * 1024 and t.facts.cores == 4


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("clock_hz = 150_000_000", "clock_hz = 150_000_000\nclock_mhz = 150", "facts: unknown key 'clock_mhz'"),
        ("pencil = 8\n", "", "facts: missing key 'pencil'"),
        ("cores = 2", 'cores = "two"', "facts.cores: expected int, got str 'two'"),
        ("mac_int8 = 0.07", "mac_int8 = -1.0", "energy_pj.mac_int8: must not be negative"),
        ('precisions = ["w8a16", "w4a8"]', 'precisions = ["w2a2"]', "unknown precision 'w2a2'"),
        ("[energy_pj]", "[energy]", "unknown key 'energy'"),
        ("layer_weight_bits = [8, 4]", "layer_weight_bits = [8, 2]", "assumptions.layer_weight_bits: give weight widths"),
        ("layer_weight_bits = [8, 4]", "layer_weight_bits = []", "assumptions.layer_weight_bits: give weight widths"),
    ],
)
def test_bad_descriptions_name_file_and_key(tmp_path, old, new, message):
    path = tmp_path / "bad.toml"
    path.write_text(DEFAULT.read_text().replace(old, new, 1))
    with pytest.raises(FemtoccError) as err:
        load(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FemtoccError, match="does not exist"):
        load(tmp_path / "none.toml")
    (tmp_path / "x.toml").write_text("cores = = 2")
    with pytest.raises(FemtoccError, match="not valid TOML"):
        load(tmp_path / "x.toml")


VARIANT = DEFAULT.parent / "variants" / "pencil16-4core.toml"


def test_the_c_header_is_what_the_python_sources_generate():
    """runtime/spu_isa.h (format, ISA, target keys) is generated, never edited: regenerate it with
    `python -m femtocc.runtime.isa_header runtime/spu_isa.h` after changing program.py or the description."""
    from femtocc.runtime.isa_header import generate

    header = Path(__file__).parent.parent / "runtime" / "spu_isa.h"
    assert header.read_text() == generate()


def test_the_simulator_reads_exactly_the_description_keys():
    from femtocc.runtime.isa_header import config_fields
    from femtocc.runtime.sim import sim_config
    from femtocc.targets.spu001.description import Assumptions, Energy, Facts

    numbers = {f.name for cls in (Facts, Assumptions, Energy) for f in fields(cls) if f.type != "list"}
    assert set(sim_config(load())) == {k for k, _ in config_fields()} == numbers


def test_the_simulator_refuses_an_unknown_or_missing_config_key():
    from test_program import block

    from femtocc.runtime.sim import extension, sim_config
    from femtocc.targets.spu001.codegen import generate

    g, _ = block(Path("."))
    program = generate(g, load()).to_bytes()
    config = sim_config(load())
    with pytest.raises(ValueError, match="unknown key 'clock_mhz'"):
        extension().Simulator(program, dict(config, clock_mhz=150))
    with pytest.raises(ValueError, match="missing pencil"):
        extension().Simulator(program, {k: v for k, v in config.items() if k != "pencil"})


def test_a_second_chip_compiles_and_runs_bit_exact_with_no_code_change():
    """The pencil16-4core variant: 16-high pencils, 4 cores, 128-bit words, 2 MiB of SRAM."""
    from test_program import block

    from femtocc.runtime.program import Program
    from femtocc.runtime.reference import ReferenceRuntime
    from femtocc.runtime.sim import SimRuntime
    from femtocc.targets.spu001.codegen import generate
    from femtocc.targets.spu001.cost import weight_cost

    t = load(VARIANT)
    assert (t.facts.cores, t.facts.pencil, t.sram_bytes) == (4, 16, 2 << 20)
    g, feeds = block(Path("."), pencil=16, target=str(VARIANT))
    assert g.constants["w1.q"].type.encoding == "pencil16" and weight_cost(g.constants["w1.q"], t)["format"] == "pencil16"
    data = generate(g, t).to_bytes()
    prog = Program.from_bytes(data)
    assert (prog.cores, prog.sram_bytes_per_core) == (4, 512 * 1024)
    assert [(b.layout, b.block) for b in prog.buffers if b.name == "w1.q"] == [("pencil", 16)]
    x = np.clip(np.rint(feeds["x"] / prog.inputs[0].scale), -32767, 32767).astype(np.int16)
    ref = ReferenceRuntime(prog).run({"x": x})
    sim, stats = SimRuntime(data, t).run({"x": x})
    assert all(np.array_equal(ref[k], sim[k]) for k in ref)
    # the spu001 program of the same graph is a different program: the description decides
    g8, _ = block(Path("."), pencil=16)
    assert generate(g8, load()).to_bytes() != data
    # and a program runs only on the chip it was compiled for
    with pytest.raises(ProgramError, match="compiled for 4 cores with 524288 bytes of SRAM each; this target has 2 with"):
        SimRuntime(data, load())


def test_the_simulator_refuses_pencils_of_another_height(tmp_path):
    from test_program import block

    from femtocc.runtime.sim import SimRuntime
    from femtocc.targets.spu001.codegen import generate

    g, _ = block(tmp_path)
    data = generate(g, load()).to_bytes()
    path = tmp_path / "p16.toml"
    path.write_text(DEFAULT.read_text().replace("pencil = 8", "pencil = 16"))
    with pytest.raises(ProgramError, match="weight w1.q is stored in pencils of 8; this target reads pencils of 16"):
        SimRuntime(data, load(path))


@pytest.mark.parametrize("key, value, message", [
    ("program_memory_instructions_per_core = 4096", "program_memory_instructions_per_core = 5",
     "needs 9 instructions; spu001's program memory holds 5 per core (facts.program_memory_instructions_per_core)"),
    ("table_memory_bytes_per_core = 16384", "table_memory_bytes_per_core = 1024",
     "bytes; spu001's table memory holds 1024 per core (facts.table_memory_bytes_per_core)"),
])
def test_a_program_that_overflows_program_or_table_memory_is_refused(tmp_path, key, value, message):
    from test_program import block

    from femtocc.targets.spu001.codegen import generate

    path = tmp_path / "small.toml"
    path.write_text(DEFAULT.read_text().replace(key, value))
    g, _ = block(tmp_path, target=str(path))
    with pytest.raises(FemtoccError) as err:
        generate(g, load(path))
    assert message in str(err.value) and "\n" not in str(err.value)
