"""femtocc compile / run / show on real tiny.en with a few utterances."""

import json

import numpy as np
import pytest

from femtocc.cli import main


@pytest.fixture(scope="module")
def build(tmp_path_factory, tiny, dev_data):
    out = tmp_path_factory.mktemp("build") / "tiny-obs30"
    assert main(["compile", "whisper-tiny.en", "--target", "spu001", "--method", "obs", "--sparsity", "0.3",
                 "--pattern", "pencil8", "--calib", str(dev_data), "--calib-limit", "3", "-o", str(out), "--quiet",
                 "--save-ir"]) == 0
    return out


@pytest.fixture(scope="module")
def build_w8a16(tmp_path_factory, tiny, dev_data):
    out = tmp_path_factory.mktemp("build") / "tiny-w8a16"
    assert main(["compile", "whisper-tiny.en", "--calib", str(dev_data), "--calib-limit", "3", "-o", str(out), "--quiet"]) == 0
    return out


def test_compile_writes_programs_and_report(build):
    from femtocc.runtime.reference import load_program

    names = {p.name for p in build.iterdir()}
    assert {"encoder.spu", "cross_kv.spu", "decoder_step.spu", "build.json", "report.json", "report.png", "ranges.json"} <= names
    report = json.loads((build / "report.json").read_text())
    assert set(report["stages_s"]) == {"load", "prune", "import", "ranges", "quantize", "layout", "tile", "codegen", "total"}
    enc = [r for r in report["layers"] if r["graph"] == "encoder"]
    assert len(enc) == 26 and all(0.295 < r["sparsity"] < 0.4 for r in enc)  # int8 rounding adds a few zeros
    assert all(r["format"] in ("dense", "pencil8") and r["bytes"] <= r["dense_bytes"] for r in report["layers"])
    rows = report["weight_bytes_vs_sparsity"]["rows"]
    assert rows[0]["encoder_bytes"] == 7_612_416 and report["weight_bytes_vs_sparsity"]["encoder_resident_from"] == 0.9
    for name in ("encoder", "cross_kv", "decoder_step"):
        prog = load_program(build / f"{name}.spu")
        assert prog.graph == name and prog.target == "spu001"
        assert all(s.scale > 0 for s in prog.outputs if s.name != "logits" or True)


def test_programs_compute_exactly_what_the_quantized_ir_computes(build, tiny, dev_utts):
    from femtocc.decode import GraphBackend, build_runners, ir_runner, transcribe
    from femtocc.ir import load

    runners, manifest = build_runners(build)
    assert manifest["model"] == "whisper-tiny.en" and manifest["pruning"]["config"]["pattern"] == "pencil8"
    programs = transcribe(tiny, GraphBackend("spu", runners, tiny.config), dev_utts[:2])
    ir = {w: ir_runner(load(build / "ir" / f"{w}.fir")) for w in runners}
    graphs = transcribe(tiny, GraphBackend("ir", ir, tiny.config), dev_utts[:2])
    assert [t.tokens for t in programs] == [t.tokens for t in graphs]


def test_run_w8a16_on_the_reference_runtime(build_w8a16, dev_utts, capsys, tmp_path):
    out = tmp_path / "run.json"
    data = str(dev_utts[0].audio_path.parent)
    assert main(["run", str(build_w8a16), "--data", data, "--limit", "3", "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["report"]["utterances"] == 3 and result["runtime"] == "reference"
    assert result["report"]["agreement_wer"] <= 10  # W8A16 alone decodes like the float model
    assert "reference" in capsys.readouterr().out


def test_show_disassembles_and_rejects_corrupt_programs(build, capsys, tmp_path):
    assert main(["show", str(build / "cross_kv.spu")]) == 0
    text = capsys.readouterr().out
    assert "graph=cross_kv" in text and "qdense" in text and "input  encoder_hidden_states" in text
    data = bytearray((build / "cross_kv.spu").read_bytes())
    data[1000] ^= 1
    bad = tmp_path / "bad.spu"
    bad.write_bytes(bytes(data))
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.spu: checksum mismatch" in err and "Traceback" not in err
    assert main(["run", str(tmp_path)]) == 2
    assert "not a femtocc build" in capsys.readouterr().err


def test_compile_is_deterministic(build_w8a16, tmp_path, dev_data):
    again = tmp_path / "again"
    assert main(["compile", "whisper-tiny.en", "--calib", str(dev_data), "--calib-limit", "3", "-o", str(again), "--quiet"]) == 0
    for name in ("encoder.spu", "cross_kv.spu", "decoder_step.spu"):
        assert (again / name).read_bytes() == (build_w8a16 / name).read_bytes(), name
    assert np.isfinite(json.loads((again / "report.json").read_text())["stages_s"]["total"])


def test_run_on_the_simulator_reports_latency_and_energy(build_w8a16, dev_utts, capsys, tmp_path):
    out = tmp_path / "sim.json"
    data = str(dev_utts[0].audio_path.parent)
    assert main(["run", str(build_w8a16), "--runtime", "sim", "--data", data, "--limit", "1", "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    sim = result["report"]["simulator"]
    assert sim["latency_s_mean"] > 0 and sim["energy_uj_mean"] > 0 and sim["real_time_factor"] > 0
    assert len(sim["sram_words_per_bank_per_utterance"]["reads"]) == 8
    enc = [v for v in sim["layers"].values() if v["graph"] == "encoder"]
    assert len(enc) == 26 and all(0 < v["activation_density"] <= 1 for v in enc)
    utt = result["utterances"][0]
    assert utt["sim_decoder_steps"] == len(utt["tokens"]) + 1 and utt["sim_cycles"]["encoder"] > 0
    assert (tmp_path / "sim-timeline.png").is_file() and not (build_w8a16 / "sim-timeline.png").exists()
    assert "latency per utterance" in capsys.readouterr().out


def test_run_writes_nothing_unless_asked(build_w8a16, dev_utts, capsys, tmp_path, monkeypatch):
    before = sorted(p.name for p in build_w8a16.iterdir())
    monkeypatch.chdir(tmp_path)
    data = str(dev_utts[0].audio_path.parent)
    assert main(["run", str(build_w8a16), "--runtime", "sim", "--data", data, "--limit", "1", "--quiet"]) == 0
    assert sorted(p.name for p in build_w8a16.iterdir()) == before and list(tmp_path.iterdir()) == []
    assert "not written (--json OUT writes them, and the timeline beside them)" in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    (lambda text, m: text[: len(text) // 2], "build.json: not valid JSON"),
    (lambda text, m: "[1, 2]", "build.json: expected a JSON object, found list"),
    (lambda text, m: json.dumps({k: v for k, v in m.items() if k not in ("programs", "quant")}), "missing quant, programs"),
    (lambda text, m: json.dumps(dict(m, format="femtocc-build/9")), "format 'femtocc-build/9'"),
    (lambda text, m: json.dumps(dict(m, programs=dict(m["programs"], encoder="../../../../../../etc/passwd"))),
     "programs.encoder = '../../../../../../etc/passwd' is outside the build folder"),
    (lambda text, m: json.dumps(dict(m, programs=dict(m["programs"], encoder="decoder_step.spu"))),
     "graph 'decoder_step' in the program, 'encoder' in build.json"),
    (lambda text, m: json.dumps(dict(m, target="spu002")), "target 'spu001' in the program, 'spu002' in build.json"),
    (lambda text, m: json.dumps(dict(m, quant="w4a8")), "weight bits {8} in the program, {4} in build.json (quant w4a8)"),
])
def test_a_damaged_build_json_is_a_one_line_error(build_w8a16, tmp_path, capsys, edit, message):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(build_w8a16, copy)
    text = (copy / "build.json").read_text()
    (copy / "build.json").write_text(edit(text, json.loads(text)))
    assert main(["run", str(copy), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "internal error" not in err, err


def test_run_transcribes_long_audio_on_the_compiled_programs(build_w8a16, dev_utts, tmp_path):
    """A 37-s recording through the W8A16 programs on the reference runtime, window by window
    (the same recording and bound as test_robustness.py on the float model)."""
    from test_robustness import long_recording

    utts = [u for u in dev_utts if 4 < len(u.audio()) / 16000 < 9][:6]
    folder = long_recording(utts, tmp_path / "long")
    out = tmp_path / "long.json"
    assert main(["run", str(build_w8a16), "--data", str(folder), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    (utt,) = result["utterances"]
    assert utt["duration_s"] > 35 and not utt["hit_limit"] and result["report"]["wer"] < 30
    assert utt["hypothesis"].rstrip(".").endswith("health and zest")


@pytest.mark.parametrize("runtime", ["reference", "sim"])
def test_run_with_two_workers_gives_what_one_worker_gives(build_w8a16, dev_utts, tmp_path, runtime):
    data = str(dev_utts[0].audio_path.parent)
    results = []
    for workers in ("1", "2"):
        out = tmp_path / f"{workers}.json"
        assert main(["run", str(build_w8a16), "--runtime", runtime, "--data", data, "--split", "eval", "--limit", "3",
                     "--workers", workers, "--json", str(out), "--quiet"]) == 0
        result = json.loads(out.read_text())
        for u in result["utterances"]:
            del u["seconds"]  # host time
        result["report"].pop("seconds")
        results.append((result["utterances"], result["report"]))
    assert results[0] == results[1]


def test_a_second_chip_variant_compiles_tiny_and_runs_bit_exact(tiny, dev_utts, dev_data, tmp_path, capsys):
    """targets/spu001/variants/pencil16-4core.toml (16-high pencils, 4 cores, 2 MiB SRAM): tiny.en
    compiles for it with no code change, pruned in its native pencil16, and the reference runtime and
    the simulator decode the same tokens."""
    from femtocc.targets.spu001 import DEFAULT

    variant = DEFAULT.parent / "variants" / "pencil16-4core.toml"
    out = tmp_path / "p16"
    assert main(["compile", "whisper-tiny.en", "--target-file", str(variant), "--method", "obs", "--sparsity", "0.5",
                 "--calib", str(dev_data), "--calib-limit", "2", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "spu001-p16x4" and report["pruning"]["config"]["pattern"] == "pencil16"
    assert {r["format"] for r in report["layers"]} == {"dense", "pencil16"}
    assert report["weight_bytes_vs_sparsity"]["sram_bytes"] == 2 << 20
    data = str(dev_utts[0].audio_path.parent)
    tokens = {}
    for runtime in ("reference", "sim"):
        path = tmp_path / f"{runtime}.json"
        assert main(["run", str(out), "--runtime", runtime, "--data", data, "--limit", "2", "--json", str(path), "--quiet"]) == 0
        tokens[runtime] = [u["tokens"] for u in json.loads(path.read_text())["utterances"]]
    assert tokens["reference"] == tokens["sim"] and all(tokens["sim"])
    assert "pencil16 layers" in capsys.readouterr().out
