"""femtocc sweep (issue 19): grid files, records, resume, failures, the Pareto front, and Ray."""

import json
from pathlib import Path

import pytest

from femtocc.cli import main
from femtocc.errors import FemtoccError
from femtocc.sweep import RECORDS, load_grid, pareto, read_records

GRID = """
[sweep]
data = "{data}"
limit = 1
calib_limit = 2

[[strategy]]
name = "dense"
model = "whisper-tiny.en"
method = "none"
quant = ["w8a16", "w4a8"]
"""


def write(tmp_path: Path, text: str, name="grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nmethod = 'none'\nfoo = 1\n", "strategy[0].foo: unknown key"),
    ("[[strategy]]\nmodel = 'whisper-huge'\nmethod = 'none'\n", "strategy[0].model: 'whisper-huge' is not a packaged"),
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nmethod = 'svd'\nsparsity = 0.5\n", "strategy[0].method: 'svd'"),
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nmethod = 'obs'\npattern = 'pencil3x'\nsparsity = 0.5\n", "strategy[0].pattern"),
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nmethod = 'obs'\nsparsity = '0.5'\n", "strategy[0].sparsity: expected float"),
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nmethod = 'obs'\n", "needs a sparsity"),
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nquant = 'w2a2'\n", "strategy[0].quant: 'w2a2'"),
    ("[[strategy]]\nmodel = 'whisper-tiny.en'\nbuckets = '10,20'\n", "strategy[0].buckets"),
    ("[sweep]\nruntime = 'gpu'\n[[strategy]]\nmodel = 'whisper-tiny.en'\n", "sweep.runtime: 'gpu'"),
    ("[sweep]\nlimt = 3\n[[strategy]]\nmodel = 'whisper-tiny.en'\n", "sweep.limt: unknown key"),
    ("[sweep]\nlimit = 3\n", "no [[strategy]]"),
    ("[[strategy]\nmodel = 1", "not a valid TOML grid"),
])
def test_a_malformed_grid_is_a_one_line_error_naming_the_key(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(FemtoccError, match=None) as e:
        load_grid(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["sweep", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_grid_expands_every_combination_with_stable_ids(tmp_path):
    path = write(tmp_path, "[[strategy]]\nname = 'one-shot'\nmodel = 'whisper-tiny.en'\nmethod = ['obs', 'mp-local']\n"
                           "pattern = ['unstructured', 'pencil8']\nsparsity = [0.3, 0.5]\nquant = 'w8a16'\n")
    sweep, points = load_grid(path)
    assert len(points) == 8 and len({p["id"] for p in points}) == 8 and sweep["runtime"] == "reference"
    assert [p["id"] for p in load_grid(path)[1]] == [p["id"] for p in points]
    renamed = write(tmp_path, path.read_text().replace("one-shot", "renamed"), "renamed.toml")
    assert [p["id"] for p in load_grid(renamed)[1]] == [p["id"] for p in points]  # the name is not the point


def test_the_pareto_front_keeps_the_points_nothing_beats():
    records = [{"id": "a", "wer": 10.0, "bytes": 8}, {"id": "b", "wer": 12.0, "bytes": 4},
               {"id": "c", "wer": 13.0, "bytes": 6}, {"id": "d", "wer": 30.0, "bytes": 1},
               {"id": "e", "wer": 11.0, "bytes": 9}, {"id": "f", "wer": 1.0, "bytes": None}]
    assert [r["id"] for r in pareto(records, "bytes")] == ["d", "b", "a"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, dev_data, tiny):
    tmp = tmp_path_factory.mktemp("sweep")
    grid = write(tmp, GRID.format(data=dev_data))
    out = tmp / "local"
    assert main(["sweep", str(grid), "-o", str(out), "--workers", "2", "--quiet"]) == 0
    return tmp, grid, out


def _comparable(records: dict) -> dict:
    """Records without what depends on the machine's speed."""
    return {i: {k: v for k, v in r.items() if k not in ("seconds", "compile_s")} for i, r in records.items()}


def test_a_sweep_records_every_point_and_draws_its_front(local_sweep, capsys):
    _, _, out = local_sweep
    records = read_records(out)
    assert len(records) == 2 and all(r["status"] == "done" for r in records.values())
    w8, w4 = sorted(records.values(), key=lambda r: -r["weight_bytes"])
    assert w8["point"]["quant"] == "w8a16" and w4["weight_bytes"] < 0.6 * w8["weight_bytes"]
    for r in records.values():
        assert r["utterances"] == 1 and r["wer"] >= 0 and r["cycles_per_utterance"] > 0 and r["sram_resident_bytes"] > 0
    assert main(["sweep", "--report", str(out)]) == 0
    result = json.loads((out / "pareto.json").read_text())
    assert result["points"] == 2 and set(result["fronts"]) >= {"weight_bytes", "cycles_per_utterance"}
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "front of WER against weight_bytes" in capsys.readouterr().out


def test_rerunning_skips_done_points_and_an_interrupted_sweep_loses_only_the_point_in_flight(local_sweep, tmp_path, capsys):
    _, grid, out = local_sweep
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    lines = (out / RECORDS).read_text().splitlines()
    (resumed / "sweep.json").write_text("{}")
    (resumed / RECORDS).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing the second
    assert main(["sweep", str(grid), "-o", str(resumed), "--quiet"]) == 0
    assert "1 already done, 1 run (0 failed)" in capsys.readouterr().out
    assert _comparable(read_records(resumed)) == _comparable(read_records(out))
    assert main(["sweep", str(grid), "-o", str(resumed), "--quiet"]) == 0
    assert "2 already done, 0 run" in capsys.readouterr().out


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, dev_data, capsys):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    grid = write(tmp_path, f"[sweep]\ndata = '{dev_data}'\nlimit = 1\ncalib_limit = 1\n"
                           f"[[strategy]]\nname = 'broken'\nmodel = ['{not_a_model}', '{not_a_model}/']\n")
    assert main(["sweep", str(grid), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    records = read_records(tmp_path / "out")
    assert len(records) == 2 and all(r["status"] == "failed" for r in records.values())
    r = next(iter(records.values()))
    assert r["failed_command"] == "femtocc compile" and "not a model folder" in r["error"]
    assert "2 run (2 failed)" in capsys.readouterr().out


def test_the_ray_path_gives_the_local_records(local_sweep):
    pytest.importorskip("ray")
    tmp, grid, out = local_sweep
    on_ray = tmp / "ray"
    assert main(["sweep", str(grid), "-o", str(on_ray), "--ray", "--ray-cpus", "1", "--ray-memory-gb", "2", "--quiet"]) == 0
    assert _comparable(read_records(on_ray)) == _comparable(read_records(out))
