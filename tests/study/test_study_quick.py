"""`python -m study run --quick`: the whole study pipeline at toy scale, its files and results.json's keys.

It checks the pipeline and the formats, not the numbers (toy models learn nothing in a few steps).
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from study import worth
from study.run import QUICK, Run, main
from study.world import PATTERN_WORDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHOD_KEYS = {
    "identity_top1",
    "identity_cos",
    "background_acc",
    "placement_acc",
    "size_acc",
    "pose_acc",
    "light_acc",
    "cap_acc",
    "background_leak",
    "n",
}


def study_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m study ARGS` in this process (torch and diffusers are imported once for the file, not per call):
    its exit code, as the command line's would be, and its output. The fixture runs the real command once."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # as Python exits on it: a message goes to stderr with status 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = 1 if isinstance(e.code, str) else e.code or 0
    return subprocess.CompletedProcess(["python", "-m", "study", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    docs = tmp_path_factory.mktemp("docs")
    readme = docs / "README.md"
    readme.write_text("# title\n\n<!-- study:start -->\nold\n<!-- study:end -->\n\n## after\n")
    cmd = [sys.executable, "-m", "study", "run", "--quick", "--out", str(out), "--docs", str(docs)]
    cmd += ["--readme", str(readme)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, docs, done.stdout


def test_results_hold_every_key(quick_run):
    """The keys issue 17 lists, for every method of its tables."""
    out, docs, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["heldout_identities"] == 6
    for method in ("base", "single_token", "decoupled", "bridge", "nested"):
        assert METHOD_KEYS <= set(results["methods"][method]), method
        assert results["methods"][method]["n"] == 4
        assert set(results["attributes"][method]) == {"pose_acc", "light_acc", "cap_acc"}
    for method in ("decoupled", "decoupled_masked", "bridge", "nested"):
        cell = results["multi"][method]
        assert {"identity_top1", "swap_rate", "blend_rate", "background_acc"} <= set(cell) and cell["n"] == 2
        assert abs(cell["identity_top1"] + cell["swap_rate"] + cell["blend_rate"] - 1) < 1e-3  # a partition
    for method in ("nested", "decoupled", "bridge"):
        points = results["tradeoff"][method]
        assert [p["strength"] for p in points] == [0.0, 1.0, 2.0]
        assert all({"identity_top1", "attribute_acc"} <= set(p) for p in points)
    assert {"render", "vae"} == set(results["ceiling"])

    share = results["base"]["trigger_share"]
    assert 0 <= share["elsewhere"] <= 1 and 0 <= share["product"] <= 1 and len(share["layers"]) >= 4
    assert 0 <= results["paired"]["nested_vs_decoupled_swap"]["sign_test_p"] <= 1
    stages = json.loads((out / "stages.json").read_text())
    assert 0 <= stages["probe"]["heldout_vae_top1"] <= 1 and stages["probe"]["config"]["vae_share"] == 0.5
    total = sum(v["stage_seconds"] for k, v in stages.items() if k not in ("scale", "report"))
    assert results["run_seconds"] == pytest.approx(total, abs=0.2)
    assert json.loads((docs / "study" / "results.json").read_text()) == results


def test_readme_block_is_filled_and_the_rest_kept(quick_run):
    _, docs, _ = quick_run
    text = (docs / "README.md").read_text()
    assert text.startswith("# title\n\n<!-- study:start -->\n## Does it work?") and text.endswith("\n\n## after\n")
    assert "\nold\n" not in text and "](study/samples.png)" in text and "| nested |" in text


def test_files_have_the_formats_users_load(quick_run):
    """The base is a diffusers folder the commands load; adapters are ours (nested) and IP-Adapter Plus (decoupled)."""
    from safetensors import safe_open

    from na_engine.families.unet import load_base
    from na_engine.formats import load_adapter
    from na_engine.standalone.models import load_vision

    out, docs, _ = quick_run
    base = load_base(str(out / "base"))
    assert base.scheduler.config.prediction_type == "v_prediction" and not base.is_xl
    load_vision(str(out / "encoders" / "vision"))
    adapters = out / "encoders" / "adapters"
    assert load_adapter(str(adapters / "nested.safetensors")).config.num_queries == 4
    assert load_adapter(str(adapters / "single_token.safetensors")).config.num_queries == 1
    with safe_open(str(adapters / "decoupled.safetensors"), framework="pt") as f:
        assert "image_proj.latents" in f.keys() and "ip_adapter.1.to_k_ip.weight" in f.keys()
    assert load_adapter(str(adapters / "decoupled.safetensors")).family == "ip_adapter_plus"
    study = (docs / "STUDY.md").read_text()
    assert "| nested |" in study and "study/tradeoff.png" in study
    assert {"tradeoff.png", "samples.png", "multi.png", "maps.png"} <= set(os.listdir(docs / "study"))


def test_a_finished_run_resumes_without_redoing_stages(quick_run):
    out, _, _ = quick_run
    done = study_cli("run", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("world", "base", "encoders", "probe", "evaluation", "report"):
        assert f"{stage}: done before, kept" in done.stdout


def test_diagnose_reads_seen_products(quick_run):
    """`python -m study diagnose` after a run: every main-table method on as many train identities as held out."""
    out, _, _ = quick_run
    cmd = ["diagnose", "--quick", "--out", str(out)]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    diagnosis = json.loads((out / "diagnosis.json").read_text())
    retrieval = diagnosis["token_retrieval"]["top1"]
    assert set(retrieval) == {"as_evaluated", "masked", "same_attributes"}
    for row in retrieval.values():
        assert set(row) == {"tower_features", "nested", "single_token", "decoupled"}
        assert all(0 <= v <= 1 for v in row.values())
    drift = diagnosis["attribute_drift"]["methods"]
    assert set(drift) == {"nested", "decoupled", "bridge"} and [p["strength"] for p in drift["nested"]] == [0, 1, 2]
    assert {"identity_top1", "pose_acc", "light_acc", "cap_acc", "size_acc"} <= set(drift["nested"][0])
    seen, drawn = diagnosis["seen_products"], diagnosis["drawn_products"]
    for reading in (seen, drawn):
        assert set(reading["methods"]) == {"base", "single_token", "decoupled", "bridge", "nested"}
        assert all(METHOD_KEYS <= set(cell) and cell["n"] == 12 for cell in reading["methods"].values())
    assert "the base drew" in drawn["what"] and (out / "diagnosis" / "drawn_nested.json").is_file()
    assert seen["methods"]["base"] != drawn["methods"]["base"]  # other products, other readings
    told = diagnosis["described"]
    assert METHOD_KEYS <= set(told["reading"]) and told["reading"]["n"] == 4
    assert any(w in told["example_prompt"].split() for w in PATTERN_WORDS.values())
    told_drawn = diagnosis["described_drawn"]  # drawn_products' cases, told: its own cell, beside drawn_base
    assert "the base drew" in told_drawn["what"] and told_drawn["reading"]["n"] == drawn["methods"]["base"]["n"]
    assert any(w in told_drawn["example_prompt"].split() for w in PATTERN_WORDS.values())
    assert told_drawn["reading"] != drawn["methods"]["base"]  # the same cases, told
    assert (out / "diagnosis" / "described_drawn_base.json").is_file()
    alike = diagnosis["lookalikes"]
    assert alike["render"]["n"] == alike["vae"]["n"] >= 1 and METHOD_KEYS <= set(alike["vae"])
    # one reading taken again is written beside the others, which are kept
    (out / "diagnosis" / "described_base.json").unlink()
    again = study_cli(*cmd, "--readings", "described")
    assert again.returncode == 0 and "evaluate: described_base" in again.stdout
    assert json.loads((out / "diagnosis.json").read_text()).keys() == diagnosis.keys()


def test_worth_reads_every_condition_on_held_out_and_seen_products(quick_run):
    """`python -m study worth`: the subject's worth to the denoiser, per condition, product by product."""
    out, _, _ = quick_run
    cmd = ["worth", "--quick", "--out", str(out)]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worth = json.loads((out / "worth.json").read_text())
    conditions = {"none", "text/optimised", "text/described", "nested/optimised", "decoupled/optimised"}
    conditions |= {"nested/maps_optimised"}
    conditions |= {
        f"{m}/{r}" for m in ("nested", "single_token", "decoupled") for r in ("as_evaluated", "masked", "own", "wrong")
    }
    for part in ("heldout", "seen"):
        rows = worth[part]
        assert conditions <= set(rows) and rows["none"]["n"] == 3 and rows["nested/optimised"]["n"] == 1
        assert rows["none"]["product_change_pct"] == 0 and rows["nested/masked"]["product"] > 0
        for fitted in ("text/optimised", "nested/maps_optimised"):
            assert {"fit_before", "fit_after"} <= set(rows[fitted])
    cached = json.loads((out / "worth" / "heldout.json").read_text())
    again = study_cli(*cmd)
    assert again.returncode == 0 and "worth: heldout" not in again.stdout  # every product read from its cache
    assert json.loads((out / "worth" / "heldout.json").read_text()) == cached
    # a product cached without text/described (the first), or with other words (the second), reads it again from
    # its own draws, equal to reading it afresh; one cached with today's words (the third) is not read
    stale = [dict(row) for row in cached]
    del stale[0]["text/described"]
    stale[1]["text/described"] = {**cached[1]["text/described"], "caption": "a striped amber box", "product": 9.0}
    (out / "worth" / "heldout.json").write_text(json.dumps(stale))
    filled = study_cli(*cmd)
    assert filled.returncode == 0, filled.stderr[-2000:]
    read = [line for line in filled.stdout.splitlines() if "worth: heldout" in line]
    assert [line.split()[-1] for line in read] == ["1/3", "2/3"]
    refilled = json.loads((out / "worth" / "heldout.json").read_text())
    for old, new in zip(cached, refilled):
        was, now = old["text/described"], new["text/described"]
        assert now["caption"] == was["caption"] and any(w in was["caption"] for w in PATTERN_WORDS.values())
        assert (now["product"], now["elsewhere"]) == pytest.approx((was["product"], was["elsewhere"]), rel=1e-5)


@pytest.mark.parametrize(
    "change, steps, photos, white, weight",
    [
        ("white_references", 4, "masked", True, 1.0),
        ("double_budget", 8, "as_evaluated", False, 1.0),
        ("subject_loss", 4, "as_evaluated", False, 5.0),
    ],
)
def test_pilot_trains_nested_with_one_change_and_reads_it_beside_the_round(
    quick_run, change, steps, photos, white, weight
):
    """`python -m study pilot --change`: nested trained with the change, read on the same cases as the round's,
    and its product error read beside the round's on worth's draws (which give worth's own figures)."""
    out, _, _ = quick_run
    cmd = ["pilot", "--quick", "--out", str(out), "--cases", "2", "--change", change]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pilot = json.loads((out / f"pilot_{change}.json").read_text())
    assert pilot["training"]["steps"] == steps and (out / "pilot" / f"nested_{change}.safetensors").is_file()
    assert pilot["what"].endswith(f"references {photos}; one method, not a claim")
    for cell in ("nested_round", "nested_changed"):
        assert METHOD_KEYS <= set(pilot[cell]) and pilot[cell]["n"] == 2
    assert (out / "pilot" / f"nested_{change}_{photos}.json").is_file()
    if photos == "as_evaluated":  # the round's adapter on the same cases and references: the evaluation's own rows
        rows = json.loads((out / "pilot" / "nested_round_as_evaluated.json").read_text())["rows"]
        assert rows == json.loads((out / "eval" / "main_nested.json").read_text())["rows"][:2]
    paired = pilot["identity_changed_vs_round"]
    assert paired["a_higher"] + paired["b_higher"] <= 2 and 0 <= paired["sign_test_p"] <= 1
    assert set(pilot["token_retrieval_changed"]) == {"as_evaluated", "masked", "same_attributes"}
    trainer = json.loads(next((out / "pilot").glob(f"nested_{change}_run/checkpoint-*/trainer.json")).read_text())
    assert trainer["white_references"] is white and trainer["subject_loss_weight"] == weight
    error = pilot["product_error"]
    assert error["products"] == worth.QUICK.products
    for cond in ("nested/as_evaluated", "nested/masked", "nested/wrong"):
        was, now = error["round"][cond]["product_change_pct"], error["changed"][cond]["product_change_pct"]
        assert error["changed_minus_round"][cond]["mean"] == pytest.approx(now - was, abs=0.02)
    was, now = error["round"]["nested/identity_pct"], error["changed"]["nested/identity_pct"]
    assert error["changed_minus_round"]["nested/identity_pct"]["mean"] == pytest.approx(now - was, abs=0.02)
    if change == "subject_loss":  # the round's figures are worth's own, read by read_product on the same draws
        reader, heldout = worth.Reader(str(out)), Run(str(out), QUICK).identities()[1]
        rows = []
        for k, ident in enumerate(heldout[: worth.QUICK.products]):
            others = [i for i in heldout if i.kind == ident.kind and i.index != ident.index]
            draws = worth.product_draws(worth.QUICK, "heldout", k)
            rows.append(worth.read_product(reader, ident, others, worth.QUICK, draws, fit=False))
        summary = worth.summarise(rows)
        assert error["round"]["nested/identity_pct"] == pytest.approx(summary["nested/identity_pct"], abs=0.01)
        for cond in ("nested/as_evaluated", "nested/masked", "nested/wrong"):
            for key in ("product", "elsewhere", "product_change_pct", "product_change_pct_ci95"):
                assert error["round"][cond][key] == pytest.approx(summary[cond][key], abs=0.01), (cond, key)


def test_compare_pairs_two_runs_case_by_case(quick_run, tmp_path):
    """`python -m study compare`: another run's cells on the same cases; a case only one run gets right counts."""
    import shutil

    out, _, _ = quick_run
    other = tmp_path / "other"
    shutil.copytree(out / "eval", other / "eval")
    for name in ("world.json", "stages.json"):
        shutil.copyfile(out / name, other / name)
    path = other / "eval" / "main_nested.json"
    cell = json.loads(path.read_text())
    was = bool(cell["rows"][0]["identity_top1"])
    cell["rows"][0]["identity_top1"] = not was
    path.write_text(json.dumps(cell))
    cmd = ["compare", "--quick", "--out", str(out), "--against", str(other)]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pairs = json.loads((out / "compare.json").read_text())["methods"]
    assert set(pairs) == {"base", "single_token", "decoupled", "bridge", "nested"}
    assert (pairs["nested"]["a_higher"], pairs["nested"]["b_higher"]) == ((1, 0) if was else (0, 1))
    assert all(p["a_higher"] == p["b_higher"] == 0 for m, p in pairs.items() if m != "nested")
    world = json.loads((other / "world.json").read_text())
    world["heldout"] = world["heldout"][::-1]
    (other / "world.json").write_text(json.dumps(world))
    refused = study_cli(*cmd)
    assert refused.returncode != 0 and "different worlds" in refused.stderr and "Traceback" not in refused.stderr


def test_fitting_nested_maps_moves_the_fit_and_puts_the_maps_back(quick_run):
    """worth's nested/maps_optimised fits the adapter's maps with the tokens, and leaves the adapter as loaded."""
    import numpy as np
    import torch

    from study import world, worth

    out, _, _ = quick_run
    reader = worth.Reader(str(out))
    ident = world.sample_identities(0, 30)[-1]
    rng = np.random.default_rng(0)
    target = reader.target(world.random_scene(rng, ident), *worth._draws(worth.QUICK, rng, reader.latent))
    fits = [reader.target(world.random_scene(rng, ident), *worth._draws(worth.QUICK, rng, reader.latent))]
    adapter = reader.adapters["nested"]
    before = [w.clone() for w in (*adapter.to_k.parameters(), *adapter.to_v.parameters())]
    tokens = torch.randn(4, adapter.config.output_dim)
    cfg = worth.QUICK.__class__(**{**worth.QUICK.__dict__, "optimise_steps": 3, "optimise_maps_lr": 0.05})
    reading = worth.with_maps_fitted(reader, tokens, fits, target, cfg)
    assert reading["fit_after"] != reading["fit_before"] and reading["product"] > 0
    _, tokens_only = worth.optimise(lambda t, x: reader.error(t, "nested", x), tokens, fits, cfg)
    assert tokens_only["fit_before"] == reading["fit_before"] and tokens_only["fit_after"] != reading["fit_after"]
    after = [*adapter.to_k.parameters(), *adapter.to_v.parameters()]
    assert all(torch.equal(a, b) and not b.requires_grad for a, b in zip(before, after))


def test_a_resumed_evaluation_counts_the_time_its_cached_cells_took(quick_run):
    """Each cell records what it took; an evaluation stage that finds its cells cached (a run stopped inside the
    stage and started again) counts their seconds, so run_seconds is a whole run's."""
    out, _, _ = quick_run
    cells = [json.loads(p.read_text()) for p in (out / "eval").glob("*.json")]
    took = sum(c["seconds"] for c in cells)
    assert cells and took > 0 and all(c["seconds"] >= 0 for c in cells)
    stages = json.loads((out / "stages.json").read_text())
    assert stages["evaluation"]["seconds_before_resume"] == 0.0  # the first run computed every cell
    report = stages.pop("report")
    del stages["evaluation"]
    (out / "stages.json").write_text(json.dumps(stages))
    cmd = ["run", "--quick", "--out", str(out), "--until", "evaluation"]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "evaluate: main_" not in done.stdout  # nothing computed again
    again = json.loads((out / "stages.json").read_text())["evaluation"]
    assert again["seconds_before_resume"] == pytest.approx(took, abs=0.05)
    assert again["stage_seconds"] >= took
    (out / "stages.json").write_text(json.dumps({**json.loads((out / "stages.json").read_text()), "report": report}))


def test_base_pilot_trains_a_wider_base_and_reads_both_alone_on_the_same_cases(quick_run):
    """`python -m study base-pilot --change wider`: the round's base trained again with a wider UNet, on the round's
    renders and VAE, and both bases read alone on the same cases; the round's plain reading is the evaluation's
    own base row, so the path without adapters draws what the evaluation drew."""
    from safetensors.torch import load_file

    from study import base_pilot, evaluate
    from study.base import BaseConfig

    out, _, _ = quick_run
    cmd = ["base-pilot", "--quick", "--out", str(out), "--change", "wider"]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pilot = json.loads((out / "base_pilot_wider.json").read_text())
    assert pilot["round_plain_is_the_evaluations"] is True
    folders = (out / "base_pilot/wider/base", out / "base")
    wider, kept = (json.loads((d / "study_base.json").read_text()) for d in folders)
    assert wider.pop("unet_widths") == [round(1.5 * w) for w in kept.pop("unet_widths")] and wider == kept
    vae = "vae/diffusion_pytorch_model.safetensors"
    was, now = load_file(out / "base" / vae), load_file(out / "base_pilot/wider/base" / vae)
    assert was.keys() == now.keys() and all(was[k].equal(now[k]) for k in was)  # the round's VAE, kept
    training = pilot["training"]
    assert training["changed"]["unet_parameters"] > 2 * training["round"]["unet_parameters"]
    assert set(training["changed"]["trigger_share"]) == {"product", "elsewhere"}
    assert set(pilot["readings"]) == {"described", "described_drawn", "plain"}
    for name, reading in pilot["readings"].items():
        assert METHOD_KEYS <= set(reading["round"]) and reading["round"]["n"] == reading["changed"]["n"] > 0, name
        file = {"plain": "main_base.json"}.get(name, f"{name}_base.json")
        cell = {who: json.loads((out / "base_pilot" / who / file).read_text()) for who in ("round", "wider")}
        assert cell["round"]["settings"] == cell["wider"]["settings"]  # the same settings and prompts, case by case
        assert cell["round"]["rows"] != cell["wider"]["rows"]  # drawn by another base
        rows = [(a["identity_top1"], b["identity_top1"]) for a, b in zip(cell["wider"]["rows"], cell["round"]["rows"])]
        paired = reading["identity_changed_vs_round"]
        assert (paired["a_higher"], paired["b_higher"]) == (sum(a > b for a, b in rows), sum(a < b for a, b in rows))
    # the changed base is trained again when its change, or the round's base, is no longer what it was made with
    record = str(out / "base_pilot/wider/training.json")
    round_print, other_print = base_pilot.fingerprint(str(out / "base")), base_pilot.fingerprint(str(folders[0]))
    cfg = base_pilot.changed_config(BaseConfig.from_record(kept | {"unet_widths": [16]}), base_pilot.CHANGES["wider"])
    assert not base_pilot._current(record, cfg, round_print)
    stages = json.loads((out / "stages.json").read_text())
    cfg = base_pilot.changed_config(BaseConfig.from_record(stages["base"]["config"]), base_pilot.CHANGES["wider"])
    assert base_pilot._current(record, cfg, round_print) and not base_pilot._current(record, cfg, other_print)
    round_cells = out / "base_pilot" / "round"
    base_pilot._keep_round_cells(str(round_cells), round_print)  # the same base: kept
    assert (round_cells / "main_base.json").is_file()
    base_pilot._keep_round_cells(str(round_cells), other_print)  # another: read again
    assert not (round_cells / "main_base.json").exists()
    # the base alone draws only what needs no adapter
    ev = evaluate.Evaluator(str(out), Run(str(out), QUICK).identities()[1], evaluate.QUICK, adapters=())
    case = evaluate.single_cases(ev.heldout, 1, 0)[0]
    with pytest.raises(ValueError, match="needs its adapter"):
        ev.generate("nested", case.prompt, [case.reference], case.seed)


def test_guidance_chooses_a_scale_on_fresh_cases_and_reads_it_beside_the_rounds_cells(quick_run):
    """`python -m study guidance`: every reading at every scale on cases the main table never drew, the scale with
    the most identity hits chosen, then the main table's cases at that scale beside the round's own cells."""
    from study import guidance

    out, _, _ = quick_run
    cmd = ["guidance", "--quick", "--out", str(out)]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "guidance.json").read_text())
    selection, confirmation = result["selection"], result["confirmation"]
    cells = {  # scale -> reading -> the selection cell's rows
        f"{s:g}": {
            r: json.loads((out / "guidance" / f"{s:g}" / f"select_{r}{'_base' * (r == 'described')}.json").read_text())
            for r in guidance.READINGS
        }
        for s in guidance.SCALES
    }
    hits = {s: sum(int(row["identity_top1"]) for c in by.values() for row in c["rows"]) for s, by in cells.items()}
    assert selection["identity_hits"] == hits
    assert selection["chosen_scale"] == guidance.chosen({float(s): h for s, h in hits.items()}, 4.0)
    assert selection["seed"] != 1000 and set(selection["readings"]) == set(cells)
    cases = selection["cases"]
    by_case = {  # scale -> each case's hits summed over the readings
        s: [sum(int(by[r]["rows"][k]["identity_top1"]) for r in guidance.READINGS) for k in range(cases)]
        for s, by in cells.items()
    }
    compared = selection["identity_vs_round_by_case"]
    assert compared["12"]["a_higher"] == sum(a > b for a, b in zip(by_case["12"], by_case["4"]))
    assert compared["12"]["b_higher"] == sum(a < b for a, b in zip(by_case["12"], by_case["4"]))
    assert compared["4"] == {"a_higher": 0, "b_higher": 0, "sign_test_p": 1.0}
    first, last = cells["2"]["nested"]["rows"], cells["12"]["nested"]["rows"]  # the same cases, another scale
    assert [r["identity_cos"] for r in first] != [r["identity_cos"] for r in last]
    for r in guidance.READINGS:  # the round's side is the evaluation's and diagnose's own cells
        round_cell = out / ("diagnosis/described_base.json" if r == "described" else f"eval/main_{r}.json")
        rows = json.loads(round_cell.read_text())["rows"]
        mean = round(sum(x["identity_top1"] for x in rows) / len(rows), 4)
        assert confirmation["readings"][r]["round"]["identity_top1"] == mean
        assert METHOD_KEYS <= set(confirmation["readings"][r]["chosen"])
    # other scales under the same rule, into their own file; the round's scale must be among them
    cmd += ["--scales", "4", "12"]
    done = study_cli(*cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    other = json.loads((out / "guidance_4_12.json").read_text())
    assert other["selection"]["identity_hits"] == {s: hits[s] for s in ("4", "12")}
    assert other["command"].endswith("--scales 4 12") and result["command"].endswith(str(out))
    cmd[-2:] = ["2", "7"]
    done = study_cli(*cmd)
    assert done.returncode == 1 and "add the round's scale, 4," in done.stderr and "Traceback" not in done.stderr
    # ties go to the round's scale, then to the lower scale
    assert guidance.chosen({2.0: 3, 4.0: 3, 7.0: 1}, 4.0) == 4.0
    assert guidance.chosen({2.0: 3, 7.0: 3, 4.0: 1}, 4.0) == 2.0
    assert guidance.chosen({2.0: 1, 4.0: 2, 12.0: 5}, 4.0) == 12.0
