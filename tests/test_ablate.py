"""`duokit ablate`: config checks, budget mapping, cells as resumable `duokit eval` runs, the achieved
budget, the results files and plots — end to end on the shipped NeedleNet with a small synthetic set."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json

import pytest
import yaml

from duokit import ablate, cli, eval_command
from duokit.ablate_config import AblationConfigError, parse_config
from duokit.io import iter_jsonl, read_json
from duokit.methods import discover_methods

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = {
    "model": "needlenet", "data": {"synth": {"per_task": 1, "seed": 7}}, "frames": 32, "dtype": "float32",
    "device": "cpu", "prepare": {"duo_gates": {"steps": 2, "sink": 4, "recent": 16}},
    "rows": [
        {"name": "baseline", "method": "baseline"},
        {"name": "random_drop", "method": "random_drop", "budgets": [0.5]},
        {"name": "fewer_frames", "method": "baseline", "scale": "frames", "budgets": [0.5]},
        {"name": "duo_random", "method": "duo", "settings": {"pattern": "@duo_gates", "sink": 4, "recent": 16},
         "budgets": [0.5], "draws": {"random_heads": [0, 1]}},
        {"name": "pool_duo", "method": "compose",
         "settings": {"parts": "llavolta(stride=2) + duo(pattern=@duo_gates,sparsity=0.5,sink=4,recent=16)"}},
    ],
}
CELLS = ["cells/baseline/settings", "cells/random_drop/rho0.5", "cells/fewer_frames/rho0.5",
         "cells/duo_random/rho0.5-random_heads0", "cells/duo_random/rho0.5-random_heads1", "cells/pool_duo/settings"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "run"
    results = ablate.run_ablation(copy.deepcopy(SMALL), out, progress=False)
    return out, results


def test_every_cell_is_an_eval_run_and_the_results_are_written(ablation):
    out, results = ablation
    assert [f"cells/{c['row']}/{c['cell']}" for c in results["cells"]] == CELLS
    for cell in CELLS:
        summary = read_json(out / cell / "summary.json")
        assert summary["scores"]["n_samples"] == 9 and (out / cell / "predictions.jsonl").is_file()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["row"] for r in rows] == ["baseline", "random_drop", "fewer_frames", "duo_random", "duo_random",
                                        "pool_duo"]
    for column in ("budget_asked", "budget_achieved_kv", "overall", "overall_1try", "ret", "ord", "cnt",
                   "kv_bytes_peak", "peak_growth_bytes_median", "prefill_s", "decode_s_per_token", "video_tokens",
                   "visual_token_layers", "prefill_flops", "n_errors", "frames", "pixels_per_frame",
                   "subtask_ret_edit1"):
        assert column in rows[0], column
    for row, cell in zip(rows, results["cells"]):  # the table is the cells' own numbers
        summary = read_json(out / f"cells/{cell['row']}/{cell['cell']}" / "summary.json")
        assert float(row["overall"]) == summary["scores"]["overall"]
        assert float(row["kv_bytes_peak"]) == summary["cost"]["kv_bytes_peak"]
    markdown = (out / "results.md").read_text()
    assert "| row | cell | asked | KV ach." in markdown and "| random_drop | rho0.5 | 0.50 | 0.50 |" in markdown
    for name in ("accuracy_kv", "accuracy_prefill", "families", "accuracy_budget"):
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(PNG)


def test_every_cell_decodes_the_tries_one_by_one_so_kv_peaks_compare(ablation):
    # The baseline could batch its 4 tries (4 suffixes held beside the prefix); in an ablation it holds one
    # try's suffix at a time like every method, so its KV peak is prefix + one suffix, as planned.
    out, _ = ablation
    for cell in CELLS:
        assert read_json(out / cell / "config.json")["decode_tries"] == "one_by_one"
    for record in iter_jsonl(out / "cells/baseline/settings/predictions.jsonl"):
        cost = record["cost"]
        assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"]
        longest_try = (cost["kv_bytes_peak"] - cost["kv_bytes"]) / (cost["kv_bytes"] / cost["prefix_tokens"])
        assert 0 < longest_try < 100  # one suffix + new tokens, not four


def test_budgets_map_to_each_methods_knob_and_are_measured(ablation):
    out, results = ablation
    cells = {f"{c['row']}/{c['cell']}": c for c in results["cells"]}
    assert cells["baseline/settings"]["budget_achieved_kv"] == 1.0
    assert read_json(out / "cells/random_drop/rho0.5/config.json")["method"]["keep"] == 0.5
    # 32 of 64 video tokens kept in every layer, or 16 frames instead of 32: exactly half the visual KV.
    assert cells["random_drop/rho0.5"]["budget_achieved_kv"] == pytest.approx(0.5)
    assert cells["fewer_frames/rho0.5"]["budget_achieved_kv"] == pytest.approx(0.5)
    assert cells["fewer_frames/rho0.5"]["budget_achieved_tokens"] == pytest.approx(0.5)
    # Duo's streaming heads keep sink + recent tokens, so it keeps more than asked; every token runs every layer.
    duo = cells["duo_random/rho0.5-random_heads0"]
    assert 0.5 < duo["budget_achieved_kv"] < 1 and duo["budget_achieved_tokens"] == pytest.approx(1.0)
    assert read_json(out / "cells/duo_random/rho0.5-random_heads1/config.json")["method"]["random_heads"] == 1
    assert cells["pool_duo/settings"]["budget_achieved_kv"] < duo["budget_achieved_kv"]
    assert cells["pool_duo/settings"]["budget_asked"] is None


def test_each_cell_records_its_preprocessing(ablation):
    _, results = ablation
    cells = {f"{c['row']}/{c['cell']}": c["preprocessing"] for c in results["cells"]}
    reference, fewer = cells["baseline/settings"], cells["fewer_frames/rho0.5"]
    assert (reference["frames"], reference["visual_tokens_planned"]) == (32, 64)
    assert (fewer["frames"], fewer["visual_tokens_planned"]) == (16, 32)
    assert reference["pixels_per_frame"] == fewer["pixels_per_frame"] == 56 * 56  # NeedleNet's frame fit
    assert fewer["fps_first_video"] == pytest.approx(reference["fps_first_video"] / 2, rel=0.1)


def test_achieved_budget_counts_every_retained_byte():
    reference = {"kv_bytes": 1000.0, "prefix_tokens": 100.0, "video_tokens": 80.0, "visual_token_layers": 320.0}
    # text = 20 tokens = 200 bytes; a cell holding 500 bytes keeps 300 of the reference's 800 visual bytes.
    got = ablate.achieved({"kv_bytes": 500.0, "visual_token_layers": 160.0}, reference)
    assert got == {"kv": pytest.approx(300 / 800), "tokens": 0.5}


def test_resume_after_a_kill_recomputes_nothing_done(ablation, monkeypatch):
    out, results = ablation
    half = out / CELLS[1] / "predictions.jsonl"
    lines = half.read_text().splitlines(keepends=True)
    half.write_text("".join(lines[:8]))  # killed after 2 of 9 samples
    (out / CELLS[1] / "summary.json").unlink()
    before = {cell: (out / cell / "predictions.jsonl").read_bytes() for cell in CELLS if cell != CELLS[1]}
    evaluated = []
    real = eval_command.evaluate_sample
    monkeypatch.setattr(eval_command, "evaluate_sample", lambda *a, **k: evaluated.append(a[2].sample_id)
                        or real(*a, **k))
    again = ablate.run_ablation(copy.deepcopy(SMALL), out, progress=False)
    assert len(evaluated) == 7  # only the 7 missing samples of the killed cell
    assert {cell: (out / cell / "predictions.jsonl").read_bytes() for cell in before} == before
    records = list(iter_jsonl(half))
    assert len(records) == len({r["record_id"] for r in records}) == len(lines)
    assert [(c["row"], c["overall"]) for c in again["cells"]] == [(c["row"], c["overall"]) for c in results["cells"]]


def test_a_changed_row_is_refused_per_cell_with_the_differing_keys(ablation):
    out, _ = ablation
    changed = copy.deepcopy(SMALL)
    changed["rows"][1]["settings"] = {"seed": 3}
    changed["rows"].append({"name": "extra", "method": "random_drop", "budgets": [0.25]})  # new cells are fine
    with pytest.raises(ValueError, match=r"cells/random_drop/rho0\.5 \(settings: .*'seed': 3") as err:
        ablate.run_ablation(changed, out, progress=False)
    assert "cells/baseline" not in str(err.value) and not (out / "cells" / "extra").exists()


def test_dry_run_prints_cells_memory_and_estimated_time(ablation, tmp_path):
    out, _ = ablation
    config = tmp_path / "abl.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    code, printed, _ = run_cli(["ablate", "--config", str(config), "--out", str(out), "--dry-run"])
    assert code == 0
    assert printed.startswith("6 cells x 9 samples (needlenet, 32 frames)")
    assert "cells/fewer_frames/rho0.5" in printed and "KV" in printed and "estimated time:" in printed


def test_cells_expand_rows_budgets_and_draws(ablation):
    out, _ = ablation
    raw = copy.deepcopy(SMALL)
    raw["rows"] += [{"name": "llavolta", "method": "llavolta", "budgets": [0.5, 0.25]},
                    {"name": "duo", "method": "duo", "settings": {"pattern": "@duo_gates"}, "budgets": [0.25]},
                    {"name": "fewer", "method": "baseline", "scale": "frames", "budgets": [0.25]}]
    config = parse_config(raw)
    shape = ablate.InputShape(config, *ablate.data_paths(config, out))
    cells = {c.folder: c for c in ablate.expand(config, shape, {"duo_gates": "/p"})}
    assert next(iter(cells)) == "cells/baseline/settings"
    assert [cells[f"cells/llavolta/rho{b}"].settings["stride"] for b in ("0.5", "0.25")] == [2, 4]
    assert cells["cells/duo/rho0.25"].settings == {"pattern": "/p", "sparsity": 0.75}
    assert cells["cells/fewer/rho0.25"].frames == 8
    assert cells["cells/pool_duo/settings"].settings["parts"].count("pattern=/p") == 1


def test_examples_parse(tmp_path):
    code, printed, _ = run_cli(["ablate", "--example", "cpu"])
    assert code == 0
    config = parse_config(yaml.safe_load(printed))
    assert {"baseline", "duo", "llavolta", "compose", "random_drop"} <= {row.method for row in config.rows}
    gpu = yaml.safe_load(ablate.example_text("gpu"))
    methods = {row["method"] for row in gpu["rows"]}
    assert {"duo", "llavolta", "flex", "llamb", "vamba", "random_drop", "compose"} <= methods
    missing = sorted(methods - set(discover_methods()))
    if missing:  # the GPU example needs all five methods: without one, one clear error names it
        with pytest.raises(AblationConfigError, match=f"'{missing[0]}' is not a registered method"):
            parse_config(gpu)
    else:
        assert parse_config(gpu).model == "Qwen/Qwen2.5-VL-3B-Instruct"


def base() -> dict:
    return {"model": "needlenet", "data": {"synth": {"per_task": 1}}, "frames": 8,
            "rows": [{"name": "baseline", "method": "baseline"},
                     {"name": "drop", "method": "random_drop", "budgets": [0.5]}]}


def edit(change):
    raw = base()
    change(raw)
    return raw


@pytest.mark.parametrize("raw, message", [
    ([1, 2], "top level: expected a mapping"),
    (edit(lambda r: r.pop("rows")), "rows: missing"),
    (edit(lambda r: r.update(frame=8)), "top level: unknown key 'frame'"),
    (edit(lambda r: r.update(frames=0)), "frames: expected an integer >= 1"),
    (edit(lambda r: r.update(data={"videos": "v"})), "data: expected"),
    (edit(lambda r: r["rows"][1].update(method="nosuch")), r"rows\[1\] \(drop\)\.method: 'nosuch' is not a registered"),
    (edit(lambda r: r["rows"][1].update(budgets=[0.5, 2])), r"rows\[1\] \(drop\)\.budgets: a budget is a retained"),
    (edit(lambda r: r["rows"][1].update(budgt=[0.5])), r"rows\[1\] \(drop\): unknown key 'budgt'"),
    (edit(lambda r: r["rows"][1].update(settings={"kep": 1})), r"rows \(drop\)\.settings: .*no setting 'kep'"),
    (edit(lambda r: r["rows"][1].update(name="baseline")), "row names must be unique; repeated: baseline"),
    (edit(lambda r: r["rows"][1].update(method="compose", budgets=[0.5])), "has no budget knob"),
    (edit(lambda r: r["rows"][1].update(scale="frames")), "a token-matched row is method `baseline`"),
    (edit(lambda r: r["rows"][1].update(settings={"seed": "@gates"})), "uses @gates, which the config's `prepare`"),
    (edit(lambda r: r["rows"][1].update(draws={"seed": 3})), r"draws: expected \{SETTING: \[value"),
    (edit(lambda r: r.update(reference="drop")), "reference: row 'drop' has several cells"),
    (edit(lambda r: r.update(prepare={"gates": {}})), "prepare.gates: unknown preparation"),
    (edit(lambda r: r.update(decode_tries="batched")), "decode_tries: must be one of together, one_by_one"),
])
def test_bad_configs_are_one_clear_error(raw, message):
    with pytest.raises(AblationConfigError, match=message):
        parse_config(raw, "abl.yaml")


def test_optional_rows_of_absent_methods_are_skipped():
    raw = edit(lambda r: r["rows"].append({"name": "x", "method": "nosuch", "optional": True}))
    config = parse_config(raw)
    assert config.skipped == ("x",) and [row.name for row in config.rows] == ["baseline", "drop"]


def test_cli_errors_without_a_traceback(tmp_path):
    code, _, err = run_cli(["ablate", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")])
    assert code == 1 and "no such config file" in err and "Traceback" not in err
    code, _, err = run_cli(["ablate", "--out", str(tmp_path / "o")])
    assert code == 1 and "give --config" in err
    assert json.loads(json.dumps(SMALL)) == SMALL  # the module's config is plain data (what notebooks pass)
