"""scripts/gpu_check.py before any GPU: its float64 reference against the brute-force definition, its time limits,
and its dry run (the same code on CPU at tiny shapes) read back from the JSON it writes."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from engine_builders import reference_nested, reference_plain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "scripts")
if SCRIPTS not in sys.path:
    sys.path.append(SCRIPTS)

import gpu_check  # noqa: E402
from gpu_check_layers import TINY, layer_inputs, reference  # noqa: E402

from na_engine.joint import widen  # noqa: E402


@pytest.mark.parametrize("shape", [TINY[0], TINY[-1]], ids=lambda s: s.model)
def test_the_reference_is_the_brute_force_definition(shape):
    """The check's own float64 formula against tests/support's per-query value tables, a CFG batch (the trigger in
    the second row only) and a joint sequence (its text queries plain)."""
    q, k, v, bind = layer_inputs(shape, torch.float64, "cpu")
    nested, plain = reference(q, k, v, shape.heads, bind, shape.t if shape.joint else 0)
    assert torch.allclose(plain, reference_plain(q, k, v, shape.heads), atol=1e-12)
    if shape.joint:
        image = reference_nested(q[:, shape.t :], k, v, shape.heads, [widen(bind, shape.keys)])
        expected = torch.cat([reference_plain(q[:, : shape.t], k, v, shape.heads), image], 1)
    else:
        expected = reference_nested(q, k, v, shape.heads, [bind])
    assert torch.allclose(nested, expected, atol=1e-12)
    changed = (nested - plain).norm() / nested.norm()
    assert changed > 0.1  # the inputs give the trigger enough attention for the change to be seen


def _slow(ctx, part):
    part.add({"done": 1})
    time.sleep(60)


def _broken(ctx, part):
    part.add({"done": 1})
    raise RuntimeError("no kernel\nsecond line")


def test_a_part_past_its_limit_is_killed_and_a_failing_part_reported_both_keeping_their_items(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.5)
    ctx = gpu_check.Context("cpu", True, str(tmp_path))
    start = time.monotonic()
    slow = gpu_check.run_part("slow", _slow, 1.0, ctx)
    assert time.monotonic() - start < 30
    assert slow["status"] == "killed at its time limit (1 s)" and slow["items"] == [{"done": 1}]
    broken = gpu_check.run_part("broken", _broken, 30, ctx)
    assert broken["status"] == "failed: RuntimeError: no kernel" and broken["items"] == [{"done": 1}]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run, as a command (the check forks its parts: a process that has run torch's thread pool, as pytest's
    has, must not be the one that forks)."""
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    cmd = [sys.executable, os.path.join(SCRIPTS, "gpu_check.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        return json.load(f), done.stdout


def test_the_dry_run_runs_every_part_and_names_the_machine(dry_run):
    report, _ = dry_run
    assert report["torch"] == torch.__version__ and "cuda" in report and report["card"].startswith("CPU")
    assert list(report["parts"]) == [name for name, *_ in gpu_check.PARTS]
    for name, part in report["parts"].items():
        assert part["status"] == "ok" and part["items"] and not part["notes"], (name, part["status"], part["notes"])
        assert part["seconds"] <= part["limit_s"] + gpu_check.GRACE_S


def test_every_method_that_applies_is_close_to_float64_in_fp16_and_bf16(dry_run):
    items = dry_run[0]["parts"]["exactness"]["items"]
    assert {(i["shape"], i["dtype"]) for i in items} == {(s.name, d) for s in TINY for d in ("fp16", "bf16")}
    for i in items:
        small = 2e-3 if i["dtype"] == "fp16" else 1e-2  # a few units in the last place of the dtype
        assert math.isfinite(i["stock_error"]) and 0 < i["stock_error"] < small, i
        assert i["change_size"] > 0.1, i
        assert i["auto"] == "statistics"  # CPU inference in half precision
        applies = {m for m, r in i["methods"].items() if r["applies"]}
        assert applies == {"fused", "statistics", "closed_form"}, i  # cpu_kernel: fp32 only, with its reason
        assert "fp32" in i["methods"]["cpu_kernel"]["why"]
        for method in applies:
            r = i["methods"][method]
            # a wrong formula would err by about the change itself: change_size (0.1 or more), change_error ~1
            assert math.isfinite(r["error"]) and r["error"] < 5 * small, (i["shape"], i["dtype"], method, r)
            assert r["change_error"] < 10 * small, (i["shape"], i["dtype"], method, r)


def test_the_layer_bench_times_each_variant_and_names_the_sdpa_kernels(dry_run):
    items = dry_run[0]["parts"]["layers"]["items"]
    assert {i["model"] for i in items} == {"sd15", "sdxl", "flux"}
    for i in items:
        variants = {"stock", "fused", "closed_form"} | ({"fused_cfg"} if i["batch"] > 1 else set())
        assert set(i["ms"]) == variants and all(t > 0 and math.isfinite(t) for t in i["ms"].values())
        assert i["x_stock"]["stock"] == 1 and i["peak_extra_mib"]["fused"] is None  # memory: CUDA only
        for call in ("stock", "fused"):
            kernels = i["kernels"][call]
            assert {c["backend"] for c in kernels["chosen"]} == {"cpu_flash"}, kernels
            widths = sorted(c["query"][-1] for c in kernels["chosen"])
            # the fused call has two bias dims more (no padding on CPU); Flux's text queries get plain attention
            expected = [i["d"]] if call == "stock" else [i["d"]] * i["joint"] + [i["d"] + 2]
            assert widths == expected, kernels
            assert {"math", "flash_attention"} <= set(kernels["accepted_alone"])
            assert set(kernels["refused_alone"]) == {"efficient_attention", "cudnn_attention"}


def test_whole_steps_bind_every_layer_and_training_reports_its_rate(dry_run):
    parts = dry_run[0]["parts"]
    for name in ("step_sdxl", "step_flux"):
        (step,) = parts[name]["items"]
        bound, layers = step["layers_bound"].split("/")
        assert bound == layers and int(layers) > 1, step  # the subject acted in every layer
        assert all(t > 0 and math.isfinite(t) for t in step["ms"].values())
    (train,) = parts["training"]["items"]
    assert train["steps_timed"] == 1 and 0 < train["steps_per_s"] < math.inf and train["peak_gib"] > 0


def test_the_summary_is_markdown_tables(dry_run):
    report, stdout = dry_run
    assert "| layer | dtype | stock SDPA | fused | statistics | closed_form | change, fused |" in stdout
    assert "| python -m na_engine train |" in stdout
    assert report["card"] in stdout
