"""na_engine.cpu_kernel: the C++ CPU kernel against the fp64 per-query reference, at the head
widths and context lengths of real models, and the dispatch and fallback around it."""

import logging
import os

import pytest
import torch
from engine_builders import make_binding, random_qkv, reference_nested

from na_engine import cpu_kernel
from na_engine.attention import nested_attention


def assert_close64(out, ref, tol=2e-5):
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:g}"


def test_kernel_is_built_in_the_test_environment():
    """The suite must exercise the kernel, not silently test only the fallback."""
    if os.environ.get("NA_CPU_KERNEL") == "0":
        pytest.skip("NA_CPU_KERNEL=0 turns the kernel off")
    assert cpu_kernel.available(), "the CPU kernel did not build: see the warning in the log"


# SD1.5 heads are 40/80/160 wide, SDXL's 64; 154 tokens is two prompt chunks; 257 tokens is one
# ViT-H image's worth; 1000 queries leaves a partial block of the kernel's 96.
@pytest.mark.parametrize(
    "n,t,heads,d,m",
    [(1000, 77, 2, 40, 16), (64, 154, 2, 80, 257), (5, 77, 1, 160, 16), (300, 77, 3, 64, 64), (97, 12, 2, 20, 3)],
)
def test_real_model_shapes_match_reference(n, t, heads, d, m):
    b = 2
    q, k, v = random_qkv(b, n, t, heads, d, seed=n + d)
    mask = torch.rand(1, n, generator=torch.Generator().manual_seed(1))
    binds = [
        make_binding(b, t, heads * d, m, {0: [5, 6], 1: [9, t - 1]}, strength=0.8, seed=1),
        make_binding(b, t, heads * d, 7, {0: [10], 1: [2]}, strength=1.5, query_mask=mask, seed=2),
    ]
    out = nested_attention(q, k, v, heads, binds, method="cpu_kernel")
    assert out.shape == q.shape and out.dtype == torch.float32
    assert_close64(out, reference_nested(q, k, v, heads, binds))


def test_strided_queries():
    """q as the first third of a fused qkv projection: rows are 3x wider than q itself."""
    q, k, v = random_qkv(2, 200, 77, 2, 64, seed=3)
    fused = torch.cat([q, torch.randn_like(q), torch.randn_like(q)], -1)[..., : q.shape[-1]]
    bind = make_binding(2, 77, 128, 16, {0: [4], 1: [4]})
    assert_close64(nested_attention(fused, k, v, 2, [bind], method="cpu_kernel"), reference_nested(q, k, v, 2, [bind]))


def test_auto_takes_the_kernel_only_when_every_row_is_bound():
    q, k, v = random_qkv(2, 100, 77, 2, 64, seed=4)
    every_row = make_binding(2, 77, 128, 16, {0: [4], 1: [7]})
    one_row = make_binding(2, 77, 128, 16, {0: [4]})
    assert torch.equal(
        nested_attention(q, k, v, 2, [every_row]), cpu_kernel.nested_attention_cpu(q, k, v, 2, [every_row])
    )
    # with CFG's unbound negative row the base runs on the whole batch anyway: SDPA's statistics are cheaper
    assert torch.equal(
        nested_attention(q, k, v, 2, [one_row]), nested_attention(q, k, v, 2, [one_row], method="statistics")
    )


def test_auto_falls_back_when_the_kernel_is_unusable(monkeypatch):
    q, k, v = random_qkv(2, 50, 77, 2, 64, seed=5)
    bind = make_binding(2, 77, 128, 16, {0: [4], 1: [7]})
    monkeypatch.setattr(cpu_kernel, "usable", lambda q, training=False: False)
    out = nested_attention(q, k, v, 2, [bind])
    assert torch.equal(out, nested_attention(q, k, v, 2, [bind], method="statistics"))
    with pytest.raises(ValueError, match="cpu_kernel.*needs fp32 CPU tensors and the built kernel"):
        nested_attention(q, k, v, 2, [bind], method="cpu_kernel")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_explicit_method_rejects_other_dtypes(dtype):
    q, k, v = random_qkv(1, 8, 10, 1, 8, dtype=dtype)
    with pytest.raises(ValueError, match="needs fp32 CPU tensors"):
        nested_attention(q, k, v, 1, [make_binding(1, 10, 8, 2, {0: [1]}, dtype=dtype)], method="cpu_kernel")


@pytest.mark.parametrize("leaf", ["q", "nested keys"])
def test_autograd_goes_to_the_closed_form(leaf):
    q, k, v = random_qkv(1, 8, 10, 1, 8)
    bind = make_binding(1, 10, 8, 2, {0: [1]})
    x = q if leaf == "q" else bind.keys
    x.requires_grad_(True)
    out = nested_attention(q, k, v, 1, [bind])
    with torch.no_grad():
        want = nested_attention(q, k, v, 1, [bind], method="closed_form")
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # fused writes q through out=, so it backpropagates into everything but q
    for method in ("statistics", "cpu_kernel") + (("fused",) if leaf == "q" else ()):
        with pytest.raises(ValueError, match="cannot backpropagate here; under autograd use 'closed_form'"):
            nested_attention(q, k, v, 1, [bind], method=method)


def test_unavailable_kernel_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "_unsupported", lambda: "a reason for the test")
    with caplog.at_level(logging.WARNING, logger="nested_attention"):
        assert cpu_kernel.available.__wrapped__() is False
    assert "fast CPU kernel is off (a reason for the test)" in caplog.text
    assert "same results, slower on CPU" in caplog.text


def test_failed_build_is_reported_by_its_first_compiler_error(monkeypatch, caplog):
    def failing_build():
        raise RuntimeError(
            "Error building extension 'x':\n[1/2] c++ -c nested.cpp\nnested.cpp:3:1: error: 'v8' does not name a "
            "type\nninja: build stopped"
        )

    monkeypatch.setattr(cpu_kernel, "_unsupported", lambda: None)
    monkeypatch.setattr(cpu_kernel, "_build", failing_build)
    with caplog.at_level(logging.WARNING, logger="nested_attention"):
        assert cpu_kernel.available.__wrapped__() is False
    assert "building it failed: nested.cpp:3:1: error: 'v8' does not name a type" in caplog.text


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv("NA_CPU_KERNEL", "0")
    assert cpu_kernel._unsupported() == "NA_CPU_KERNEL=0"


def test_raw_op_checks_its_inputs():
    """Misuse of the op gives an error, not a crash: here an fp64 query."""
    if not cpu_kernel.available():
        pytest.skip("kernel not built")
    q = torch.zeros(1, 4, 8, dtype=torch.float64)
    args = (
        torch.zeros(1, 1, 8, 8),
        torch.zeros(1, 1, 8, 8),
        torch.zeros(8),
        8,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 1, 8),
        torch.zeros(0, 1, 4),
        torch.zeros(0, 1, 4),
        96,
    )
    with pytest.raises(RuntimeError, match="fp32 CPU tensors only"):
        torch.ops.nested_attention.forward(q, *args)
