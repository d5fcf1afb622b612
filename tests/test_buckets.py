"""Encoder context buckets: a window is encoded in the smallest bucket that holds its audio, in every
backend, on the reference runtime and on the simulator (issue 18, section 1)."""

import json

import numpy as np
import pytest

from femtocc.cli import main
from femtocc.errors import FemtoccError
from femtocc.frontend.onnx_export import bucket_name, bucket_names, parse_buckets, split_name


def test_bucket_names_and_their_parsing():
    assert parse_buckets("30,10") == (10, 30) and parse_buckets([30]) == (30,)
    assert bucket_name("encoder", 30) == "encoder" and bucket_name("decoder_step", 10) == "decoder_step@10s"
    assert split_name("decoder_step@10s") == ("decoder_step", 10) and split_name("cross_kv") == ("cross_kv", 30)
    assert bucket_names((10, 30))[:3] == ["encoder@10s", "cross_kv@10s", "decoder_step@10s"]
    assert all(len(n) <= 16 for n in bucket_names(tuple(range(1, 31))))  # fits a program header
    for bad in ("10", "10,40", "0,30", "ten,30", "", 30):
        with pytest.raises(FemtoccError, match="--buckets"):
            parse_buckets(bad)


def test_the_smallest_bucket_that_holds_the_audio_is_chosen():
    from femtocc.decode import choose_bucket

    assert [choose_bucket(s, (10, 20, 30)) for s in (0.5, 10.0, 10.01, 29.0, 45.0, None)] == [10, 10, 20, 30, 30, 30]


def test_a_bucket_name_round_trips_through_the_text_ir():
    from femtocc.ir import Graph, parse_graph, print_graph
    from femtocc.ir.core import TensorType

    g = Graph("encoder@10s")
    x = g.add_input("x", TensorType("f32", (1, 4)))
    g.outputs = [g.make_node("relu", [x], [x.type]).outputs[0]]
    text = print_graph(g)
    assert text.startswith("graph @encoder@10s(") and print_graph(parse_graph(text)) == text


def test_the_cut_encoder_is_whisper_at_30s_and_the_export_matches_torch(tiny, tiny_onnx, dev_utts):
    """At 1500 frames the cut forward is transformers' own encoder; the 10-s ONNX graph computes what
    its torch module computes."""
    import torch

    from femtocc.decode import ort_runner
    from femtocc.frontend.onnx_export import export_whisper, graph_modules

    feats = tiny.features(dev_utts[1].audio())
    mods = graph_modules(tiny, (10, 30))
    cut_full = type(mods["encoder@10s"])(tiny.model, 1499)  # any frames but the full window: the cut path
    with torch.no_grad():
        full = mods["encoder"](torch.from_numpy(feats)).numpy()
        ten = mods["encoder@10s"](torch.from_numpy(feats[:, :, :1000])).numpy()
        cut = cut_full(torch.from_numpy(feats[:, :, :2998])).numpy()
    assert ten.shape == (1, 500, 384) and np.abs(cut - full[:, :1499]).max() > 0  # positions 0..1498, one frame fewer
    paths = export_whisper(tiny, buckets=(10, 30))
    assert paths["encoder"] == tiny_onnx["encoder"]  # the 30-s graphs are the same files as before
    onnx_ten = ort_runner(paths["encoder@10s"])({"input_features": feats[:, :, :1000]})["encoder_hidden_states"]
    assert np.abs(onnx_ten - ten).max() < 1e-3


@pytest.fixture(scope="module")
def bucket_build(tmp_path_factory, tiny, dev_data):
    out = tmp_path_factory.mktemp("build") / "tiny-b10"
    assert main(["compile", "whisper-tiny.en", "--buckets", "10,30", "--calib", str(dev_data), "--calib-limit", "2",
                 "-o", str(out), "--quiet"]) == 0
    return out


def test_a_bucket_build_holds_each_buckets_programs(bucket_build, capsys):
    from femtocc.runtime.reference import load_program

    manifest = json.loads((bucket_build / "build.json").read_text())
    assert manifest["buckets"] == [10, 30] and set(manifest["programs"]) == set(bucket_names((10, 30)))
    prog = load_program(bucket_build / "encoder@10s.spu")
    assert prog.graph == "encoder@10s" and [b.shape for b in prog.buffers if b.region == "input"] == [((1, 0, 0), (80, 0, 0), (1000, 0, 0))]
    report = json.loads((bucket_build / "report.json").read_text())
    enc10, enc = report["totals"]["encoder@10s"]["predicted_cycles"], report["totals"]["encoder"]["predicted_cycles"]
    assert enc10 == pytest.approx(enc / 3, rel=0.01)  # the dense layers scale with the frames
    capsys.readouterr()
    assert main(["show", str(bucket_build)]) == 0
    out = capsys.readouterr().out
    assert "buckets 10 s, 30 s" in out and "encoder@10s" in out and "i16[1, 80, 1000]" in out


def test_a_bucket_build_runs_bit_exact_and_uses_the_short_programs(bucket_build, dev_utts, tmp_path):
    data = str(dev_utts[0].audio_path.parent)
    results = {}
    for runtime in ("reference", "sim"):
        path = tmp_path / f"{runtime}.json"
        assert main(["run", str(bucket_build), "--runtime", runtime, "--data", data, "--split", "eval", "--limit", "2",
                     "--json", str(path), "--quiet"]) == 0
        results[runtime] = json.loads(path.read_text())
    tokens = {r: [u["tokens"] for u in v["utterances"]] for r, v in results.items()}
    assert tokens["reference"] == tokens["sim"] and all(tokens["sim"])
    for u in results["sim"]["utterances"]:
        assert u["duration_s"] < 10 and u["sim_cycles"]["encoder"] < 350e6  # a 30-s window costs ~1080 Mcycles
    ops = results["sim"]["report"]["simulator"]["cycles_by_op"]
    # per decoder step: the token embedding's looked-up rows only, and no transpose of the cross K (it
    # comes out of cross_kv transposed); the whole table or cross K would be ~20 MB and ~1.5 MB per step
    assert ops["decoder_step/qgather"]["external_bytes"] < 100e3
    assert ops.get("decoder_step/transpose", {"external_bytes": 0})["external_bytes"] < 1e6
    assert results["reference"]["report"]["wer"] < 40


def test_a_build_with_a_missing_bucket_program_is_a_one_line_error(bucket_build, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bucket_build, broken)
    manifest = json.loads((broken / "build.json").read_text())
    del manifest["programs"]["cross_kv@10s"]
    (broken / "build.json").write_text(json.dumps(manifest))
    assert main(["show", str(broken)]) == 2
    assert "programs must name a file for each of" in capsys.readouterr().err
    manifest["buckets"] = [10, 20]
    (broken / "build.json").write_text(json.dumps(manifest))
    assert main(["show", str(broken)]) == 2
    assert "buckets" in capsys.readouterr().err


def test_eval_with_buckets_agrees_across_the_float_backends(tiny, dev_data, tmp_path):
    """torch (the cut encoder), onnxruntime and the IR interpreter decode the same text with --buckets."""
    texts = {}
    for backend in ("torch", "onnxruntime", "ir"):
        path = tmp_path / f"{backend}.json"
        assert main(["eval", "whisper-tiny.en", "--backend", backend, "--buckets", "10,30", "--data", str(dev_data),
                     "--split", "eval", "--limit", "2", "--json", str(path), "--quiet"]) == 0
        texts[backend] = [u["hypothesis"] for u in json.loads(path.read_text())["utterances"]]
    assert texts["torch"] == texts["onnxruntime"] == texts["ir"] and all(texts["torch"])
