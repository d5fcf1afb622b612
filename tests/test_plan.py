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


def test_plan_then_compile_keeps_the_encoder_in_its_budget(tiny, dev_data, tmp_path, monkeypatch, capsys):
    """The real thing on tiny.en with a few candidates: the compiled encoder stores what the plan
    counted, within its budget, and the report says so."""
    monkeypatch.setattr(planner, "CANDIDATES", (0.0, 0.5, 0.9))
    path = tmp_path / "plan.json"
    budget = 3 * 2**20
    assert main(["plan", "whisper-tiny.en", "--sram", "3MiB", "--scope", "encoder", "--calib", str(dev_data),
                 "--calib-limit", "1", "-o", str(path), "--quiet"]) == 0
    plan = json.loads(path.read_text())
    assert plan["scope_bytes"] <= budget and set(plan["layers"]) == {n for n in plan["layers"] if n.startswith("encoder.")}
    assert {v["sparsity"] for v in plan["layers"].values()} <= {0.0, 0.5, 0.9} and len(plan["layers"]) == 26
    out = tmp_path / "build"
    assert main(["compile", "whisper-tiny.en", "--plan", str(path), "--calib", str(dev_data), "--calib-limit", "1",
                 "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    check = report["plan"]
    assert check["resident"] and check["layers"] == 26
    assert abs(check["scope_bytes"] - plan["scope_bytes"]) <= 0.01 * plan["scope_bytes"]
    assert "SRAM-resident" in capsys.readouterr().out
    assert main(["compile", "whisper-tiny.en", "--plan", str(path), "--method", "obs", "-o", str(tmp_path / "x")]) == 2


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
