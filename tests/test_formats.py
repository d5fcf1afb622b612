"""The storage formats of femtocc.ir.formats: fit, MACs, bytes, cycles, and blob round trips."""

import numpy as np
import pytest

from femtocc.ir.formats import FormatError, best_fit, parse_format
from femtocc.targets.spu001 import DEFAULT, load

rng = np.random.default_rng(4)


def weight(n_in=16, n_out=32, bits=8):
    hi = 7 if bits == 4 else 127
    w = rng.integers(1, hi + 1, (n_in, n_out)).astype(np.int8) * rng.choice(np.array([-1, 1], np.int8), (n_in, n_out))
    return w.astype(np.int8)


def pencil_pruned(w, h, fraction=0.6):
    n_in, n_out = w.shape
    keep = rng.random((n_in, n_out // h)) >= fraction
    return (w * np.repeat(keep, h, axis=1)).astype(np.int8)


def nm_pruned(w, n, m):
    """Keep n random weights of every m consecutive inputs of each output."""
    groups = w.T.reshape(w.shape[1], -1, m).copy()  # [out, groups, M]
    drop = np.argsort(rng.random(groups.shape), axis=2)[..., n:]
    np.put_along_axis(groups, drop, 0, axis=2)
    return groups.reshape(w.shape[1], w.shape[0]).T.copy()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["dense", "pencil8", "pencil16", "pencil3", "2:4", "1:4"])
def test_blobs_round_trip(name, bits):
    fmt = parse_format(name)
    w = weight(16, 48, bits)
    if name.startswith("pencil"):
        w = pencil_pruned(w, fmt.height)
    elif ":" in name:
        w = nm_pruned(w, fmt.n, fmt.m)
    assert fmt.fits(w) and fmt.name == name
    blob = fmt.encode(w, bits)
    assert np.array_equal(fmt.decode(blob, 16, 48, bits, "w"), w)


def test_bytes_macs_and_cycles_with_known_answers():
    t = load()  # 2 cores x 8 lanes, 16-bit pencil index
    w = np.ones((16, 32), np.int8)
    w[:, :8] = 0  # one pencil column of four empty everywhere
    dense, p8 = parse_format("dense"), parse_format("pencil8")
    assert (dense.macs_per_row(w), dense.nbytes(w, 8), dense.cycles_per_row(w, t)) == (512, 512, 32)
    assert (p8.pencils(w), p8.macs_per_row(w), p8.nbytes(w, 8, 16), p8.cycles_per_row(w, t)) == (48, 384, 480, 24)
    assert p8.nbytes(w, 4, 16) == 48 * (4 + 2)
    nm = parse_format("2:4")
    assert nm.macs_per_row(w) == 256 and nm.nbytes(w, 8) == 256 + 256 * 2 // 8


def test_cycles_follow_the_description(tmp_path):
    path = tmp_path / "wide.toml"
    path.write_text(DEFAULT.read_text().replace("mac_lanes_per_core = 8", "mac_lanes_per_core = 32")
                    .replace("pencil_decode_cycles = 0", "pencil_decode_cycles = 2"))
    t = load(path)  # 64 lanes; 2 decode cycles per pencil over 2 cores
    w = np.ones((16, 32), np.int8)
    assert parse_format("pencil8").cycles_per_row(w, t) == 512 // 64 + 64 * 2 // 2


def test_fit_and_best_fit():
    w = weight(16, 32)
    assert parse_format("pencil8").fits(w) and not parse_format("pencil5").fits(w)
    assert not parse_format("2:4").fits(w) and parse_format("2:4").fits(nm_pruned(w, 2, 4))
    assert best_fit(w).name == "dense"
    assert best_fit(pencil_pruned(w, 8)).name == "pencil8"
    assert best_fit(pencil_pruned(w, 16), pencil=16).name == "pencil16"
    assert best_fit(nm_pruned(w, 2, 4)).name == "2:4"
    w[0, 0] = 0
    assert best_fit(w).name == "dense"  # a stray zero: no structure, stored dense


@pytest.mark.parametrize("name, edit, message", [
    ("pencil8", lambda b: b[:-1], r"pencil weight w has (\d+) bytes, \d+ pencils need \d+"),
    ("pencil8", lambda b: b[:8], "truncated in its offsets"),
    ("pencil8", lambda b: b"\x01" + b[1:], "offsets that are not non-decreasing"),
    ("dense", lambda b: b + b"\0", r"weight w has 65 bytes, dense 8-bit \[4, 16\] needs 64"),
    ("2:4", lambda b: b"\x07" + b[1:], "has a position 7 >= M=4"),
    ("2:4", lambda b: b[:-2], "2:4 weight w has 62 bytes, 32 slots need 64"),
])
def test_bad_blobs_are_refused_naming_the_weight(name, edit, message):
    fmt = parse_format(name)
    w = weight(4, 16)
    w = pencil_pruned(w, 8, 0.3) if name == "pencil8" else nm_pruned(w, 2, 4) if name == "2:4" else w
    blob = edit(fmt.encode(w, 8))
    with pytest.raises(FormatError, match=message):
        fmt.decode(blob, 4, 16, 8, "w")


@pytest.mark.parametrize("text", ["pencil0", "3:3", "sparse", "0:4"])
def test_unknown_formats(text):
    with pytest.raises(FormatError, match="unknown storage format"):
        parse_format(text)
