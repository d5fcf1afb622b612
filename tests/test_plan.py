"""femtocc plan (issue 19, part 2): per-layer sparsities that fit a scope into an SRAM budget."""

import itertools
import json

import pytest

from femtocc.cli import main, parse_size
from femtocc.errors import FemtoccError
from femtocc.passes import plan as planner


def option(rows):
    return [{"sparsity": s, "error": e, "bytes": b, "format": "pencil8"} for s, e, b in rows]


OPTIONS = {
    "a": option([(0.0, 0.0, 100), (0.5, 0.01, 55), (0.8, 0.05, 25), (0.9, 0.30, 15)]),
    "b": option([(0.0, 0.0, 200), (0.5, 0.02, 110), (0.8, 0.03, 45), (0.9, 0.04, 25)]),
    "c": option([(0.0, 0.0, 80), (0.5, 0.20, 45), (0.8, 0.25, 20), (0.9, 0.90, 12)]),
}


def test_the_hull_drops_points_that_cost_more_error_per_byte():
    rows = option([(0.0, 0.0, 100), (0.3, 0.08, 80), (0.5, 0.1, 50), (0.7, 0.1, 40), (0.9, 0.5, 10)])
    assert [r["sparsity"] for r in planner._hull(rows)] == [0.0, 0.7, 0.9]


@pytest.mark.parametrize("budget", [380, 250, 150, 100, 70])
def test_the_choice_fits_the_budget_near_the_best_error(budget):
    chosen = planner.choose(OPTIONS, budget)
    assert sum(c["bytes"] for c in chosen.values()) <= budget
    best = min(sum(r["error"] for r in combo) for combo in itertools.product(*OPTIONS.values())
               if sum(r["bytes"] for r in combo) <= budget)
    assert sum(c["error"] for c in chosen.values()) <= best + 0.05  # the greedy hull walk: within one step


def test_a_budget_nothing_fits_names_the_shortfall():
    with pytest.raises(FemtoccError, match="needs at least 52 bytes"):
        planner.choose(OPTIONS, 40)


def test_sizes_and_bad_plans(tmp_path):
    assert parse_size("1MiB") == 2**20 and parse_size("512KiB") == 2**19 and parse_size("1MB") == 10**6
    assert parse_size("4096") == 4096
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"format": planner.PLAN_FORMAT, "layers": {"encoder.conv1": {"sparsity": 1.5}}}))
    with pytest.raises(FemtoccError, match=r"layers.encoder.conv1.sparsity must be in \[0, 1\)"):
        planner.read_plan(bad)
    bad.write_text("{}")
    with pytest.raises(FemtoccError, match="not a femtocc plan"):
        planner.read_plan(bad)


def test_plan_then_compile_keeps_the_encoder_in_its_budget_at_the_planned_widths(tiny, dev_data, tmp_path, monkeypatch, capsys):
    """The real thing on tiny.en with a few candidates: a budget that the encoder's int8 weights do
    not meet even at the sparsest candidate gives layers int4 (the target's
    assumptions.layer_weight_bits allows int8 and int4); compile stores each layer at its planned
    width (GPTQ-rounded, as the plan measured) and the scope at the planned bytes, within the
    budget, and the report says so. Widths the target does not allow are refused."""
    monkeypatch.setattr(planner, "CANDIDATES", (0.0, 0.5, 0.8))
    path = tmp_path / "plan.json"
    budget = int(1.5 * 2**20)
    assert main(["plan", "whisper-tiny.en", "--sram", "1.5MiB", "--scope", "encoder", "--calib", str(dev_data),
                 "--calib-limit", "1", "-o", str(path), "--quiet"]) == 0
    plan = json.loads(path.read_text())
    assert plan["scope_bytes"] <= budget and len(plan["layers"]) == 26 and all(n.startswith("encoder.") for n in plan["layers"])
    assert {v["sparsity"] for v in plan["layers"].values()} <= {0.0, 0.5, 0.8}
    assert plan["layer_bits"] == [8, 4] and plan["weight_quant"] == "gptq"
    assert all(len(rows) == 6 and {r["bits"] for r in rows} == {8, 4} for rows in plan["options"].values())
    at = {b: [n for n, v in plan["layers"].items() if v["bits"] == b] for b in (8, 4)}
    assert at[4], "at most 80 % pencil8, int8 weights alone cannot fit the encoder in 1.5 MiB"
    assert f"layers at 8 bits: {len(at[8])}, 4 bits: {len(at[4])}" in capsys.readouterr().out
    out = tmp_path / "build"
    assert main(["compile", "whisper-tiny.en", "--plan", str(path), "--calib", str(dev_data), "--calib-limit", "1",
                 "-o", str(out), "--quiet"]) == 0
    check = json.loads((out / "report.json").read_text())["plan"]
    assert check["resident"] and check["layers"] == 26 and check["widths_not_as_planned"] == []
    assert check["layers_at_bits"] == {str(b): len(at[b]) for b in (8, 4) if at[b]}
    assert abs(check["scope_bytes"] - plan["scope_bytes"]) <= 0.01 * plan["scope_bytes"]
    assert "SRAM-resident" in capsys.readouterr().out
    assert json.loads((out / "build.json").read_text())["weight_bits"] == [8, 4]
    tokens = {}
    for runtime in ("reference", "sim"):  # the mixed-width program runs, bit-exact on both runtimes
        result = tmp_path / f"{runtime}.json"
        assert main(["run", str(out), "--runtime", runtime, "--data", str(dev_data), "--split", "eval", "--limit", "1",
                     "--json", str(result), "--quiet"]) == 0
        tokens[runtime] = [u["tokens"] for u in json.loads(result.read_text())["utterances"]]
    assert tokens["reference"] == tokens["sim"] and tokens["sim"][0]
    assert main(["compile", "whisper-tiny.en", "--plan", str(path), "--method", "obs", "-o", str(tmp_path / "x")]) == 2
    assert main(["compile", "whisper-tiny.en", "--plan", str(path), "--quant", "w4a8", "-o", str(tmp_path / "x")]) == 2
    assert "counted bytes for w8a16; compile with --quant w8a16" in capsys.readouterr().err
    assert main(["plan", "whisper-tiny.en", "--layer-bits", "8,2", "-o", str(tmp_path / "p.json")]) == 2
    assert "--layer-bits: 2-bit weights; spu001 holds a layer's weights at 8 or 4 bits" in capsys.readouterr().err
    plan["layers"][at[4][0]]["bits"] = 3
    path.write_text(json.dumps(plan))
    assert main(["compile", "whisper-tiny.en", "--plan", str(path), "-o", str(tmp_path / "x")]) == 2
    assert f"layers.{at[4][0]}.bits: 3-bit weights" in capsys.readouterr().err


def test_compile_puts_the_pruned_token_table_into_both_of_its_uses(tiny, tiny_onnx):
    """A whole-model plan prunes the tied token table: compile must carry it into the embedding
    lookup and into the output projection (the lowered graph holds it as transpose(constant)), not
    only into the dense layers (it once compiled the unpruned table: 7.2 MB against 1.05 MB planned)."""
    import copy

    import numpy as np
    import torch

    from femtocc.compile import put_weights
    from femtocc.frontend.onnx_export import load_onnx
    from femtocc.frontend.onnx_ir import import_onnx
    from femtocc.passes import PassManager, pipeline

    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.proj_out.weight[::2] = 0  # tied: the embedding's rows too
    g = PassManager.parse(pipeline("lowered")).run(import_onnx(load_onnx(tiny_onnx["decoder_step"]), "decoder_step"))
    assert put_weights({"decoder_step": g}, model) == 2 + 4 * 8  # the table twice, 8 dense layers per block
    table = [n.inputs[0].data for n in g.nodes if n.op in ("gather", "transpose") and n.meta.get("scope") in
             ("decoder.embed_tokens", "proj_out") and n.inputs[0].is_constant]
    assert len(table) == 2
    assert all(np.array_equal(t, model.proj_out.weight.detach().numpy()) and not t[::2].any() for t in table)


def test_replanning_from_measured_options_changes_budget_and_widths(tmp_path, capsys):
    """``plan --from``: another budget or fewer widths from the same measurements, no model loaded."""
    options = {n: [{**r, "bits": 8} for r in rows] + [{**r, "bits": 4, "bytes": r["bytes"] // 2, "error": r["error"] + 0.01}
                                                    for r in rows] for n, rows in OPTIONS.items()}
    head = {"format": planner.PLAN_FORMAT, "model": "m", "scope": "model", "target": "spu001", "pattern": "pencil8",
            "quant": "w8a16", "activation_bits": 16, "weight_quant": "gptq", "objective": "o", "calibration_utterances": 1}
    plan = planner.choose_plan(head, options, {"a": 100, "b": 200, "c": 80}, 100, (8, 4))
    assert plan["scope_bytes"] <= 100 and plan["layers_at_bits"]["4"] > 0
    src = tmp_path / "plan.json"
    src.write_text(json.dumps(plan))
    out = tmp_path / "int8.json"
    assert main(["plan", "--from", str(src), "--layer-bits", "8", "--sram", "150", "-o", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["layer_bits"] == [8] and {v["bits"] for v in again["layers"].values()} == {8}
    assert again["scope_bytes"] <= 150 and again["sram_bytes"] == 150 and again["options"] == options
    assert again["layers"] == planner.choose_plan(head, options, {"a": 100, "b": 200, "c": 80}, 150, [8])["layers"]
    assert "model of m in 150 bytes" in capsys.readouterr().out
    assert main(["plan", "whisper-tiny.en", "--from", str(src), "-o", str(out)]) == 2
    assert "give no MODEL" in capsys.readouterr().err
    del plan["layers"]["b"]["parameters"]
    src.write_text(json.dumps(plan))
    assert main(["plan", "--from", str(src), "-o", str(out)]) == 2
    assert "layers.b has no parameters or measured options" in capsys.readouterr().err
    del plan["options"]
    src.write_text(json.dumps(plan))
    assert main(["plan", "--from", str(src), "-o", str(out)]) == 2
    assert "holds no measured options" in capsys.readouterr().err
    assert main(["plan", "--from", str(tmp_path / "none.json"), "-o", str(out)]) == 2
    assert f"--from {tmp_path / 'none.json'}: no such file" in capsys.readouterr().err
