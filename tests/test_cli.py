"""The femtocc command as a user meets it: one-line errors, no tracebacks, files written."""

import json
import subprocess
import sys

import numpy as np
import soundfile as sf

from femtocc.cli import main


def femtocc(*args):
    proc = subprocess.run([sys.executable, "-m", "femtocc", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_help_everywhere():
    for cmd in ([], ["import"], ["show"], ["eval"]):
        code, out, _ = femtocc(*cmd, "--help")
        assert code == 0 and "usage: femtocc" in out


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("femtocc: error: ") and message in err, err


def test_bad_inputs_give_one_line_errors(capsys, tmp_path, dev_data):
    one_line_error(capsys, ["eval", "whisper-large-v9", "--data", str(dev_data)], "unknown model 'whisper-large-v9'")
    one_line_error(capsys, ["eval", "whisper-tiny.en", "--data", str(tmp_path)], "has no utterances")
    (tmp_path / "transcripts.tsv").write_text("file\ttext\nmissing.wav\thello\n")
    one_line_error(capsys, ["eval", "whisper-tiny.en", "--data", str(tmp_path)], "audio file missing.wav listed but not found")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"not a protobuf at all")
    one_line_error(capsys, ["show", str(bad)], "corrupt.onnx: not a valid ONNX model")
    one_line_error(capsys, ["show", str(tmp_path / "none.fir")], "none.fir: no such file")
    text = tmp_path / "broken.fir"
    text.write_text("graph @g(%a: f32[2]) {\n  %b = neg(%zz) : f32[2]\n  return %b\n}\n")
    one_line_error(capsys, ["show", str(text)], "broken.fir:2:12: use of undefined value %zz")
    one_line_error(capsys, ["prune", "whisper-tiny.en", "--refit-iterations", "-1", "-o", str(tmp_path / "p")],
                   "refit iterations must be >= 0, got -1")


def test_unsupported_op_via_cli(capsys, tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Hardmax", ["x"], ["y"], name="hm")
    save(helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]),
         str(tmp_path / "u.onnx"))
    one_line_error(capsys, ["show", str(tmp_path / "u.onnx")], "node hm: ONNX op Hardmax is not supported")


def test_import_show_and_eval(tmp_path, dev_data, tiny):
    code, out, err = femtocc("import", "whisper-tiny.en", "-o", str(tmp_path / "imp"))
    assert code == 0, err
    assert "wrote" in out and (tmp_path / "imp" / "decoder_step.fir").is_file()
    code, out, err = femtocc("show", str(tmp_path / "imp" / "cross_kv.fir"), "--summary")
    assert code == 0, err
    assert "// ops: dense 8, reshape 8, transpose 8" in out
    code, out, err = femtocc("show", str(tmp_path / "imp" / "encoder.onnx"), "--pipeline", "fold-gelu,dce", "--print-ir-after", "fold-gelu", "--summary")
    assert code == 0, err
    assert "// ----- IR after fold-gelu on @encoder" in err and "gelu 6" in out

    # stereo 44.1 kHz audio in a fresh folder is handled
    audio = dev_data / "ls-test-other_1688-142285-0002.wav"
    mono, rate = sf.read(audio, dtype="float32")
    from scipy.signal import resample_poly

    up = resample_poly(mono, 441, 160).astype(np.float32)
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "x.wav", np.stack([up, up], axis=1), 44100)
    (data / "transcripts.tsv").write_text("file\ttext\nx.wav\tYOU DON'T MEAN THAT YOU THOUGHT ME SO SILLY\n")
    out_json = tmp_path / "r.json"
    code, out, err = femtocc("eval", "whisper-tiny.en", "--data", str(data), "--backend", "onnxruntime", "--json", str(out_json), "--quiet")
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["report"]["utterances"] == 1 and result["report"]["agreement_wer"] == 0.0
    assert result["utterances"][0]["hypothesis"].lower().startswith("you don't mean")


def test_eval_dev_subset_ir_backend(tmp_path, dev_data, tiny, capsys):
    out_json = tmp_path / "ir.json"
    assert main(["eval", "whisper-tiny.en", "--data", str(dev_data), "--backend", "ir", "--limit", "2", "--quiet",
                 "--json", str(out_json), "--pipeline", "fold-gelu,fold-dense,dce", "--print-ir-after", "fold-gelu"]) == 0
    err = capsys.readouterr().err
    assert err.count("// ----- IR after fold-gelu on @") == 3 and "IR after dce" not in err
    report = json.loads(out_json.read_text())["report"]
    assert report["identical_transcripts"] == 2 and report["hit_token_limit"] == 0
