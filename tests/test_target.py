import pytest

from femtocc.errors import FemtoccError
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
