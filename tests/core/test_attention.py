"""na_engine.attention: the nested attention op against a brute-force per-query reference."""

import math
import os
import time

import pytest
import torch
from engine_builders import make_binding, merge_heads, random_qkv, reference_nested, reference_plain, split_heads
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from na_engine.attention import (
    METHODS,
    NestedBinding,
    nested_attention,
    nested_correction,
    sdpa_attention,
    subject_maps,
)

EXACT_METHODS = [m for m in METHODS if m != "auto"]  # fused, cpu_kernel, statistics, closed_form
TORCH_METHODS = [m for m in EXACT_METHODS if m != "cpu_kernel"]  # the ones that also take fp64, fp16 and bf16

FP32_TOL = 1e-5
# NA_HYPOTHESIS_EXAMPLES=500 runs the property tests with that many fresh random examples;
# by default they run a fixed-seed set so CI is reproducible.
DEEP = int(os.environ.get("NA_HYPOTHESIS_EXAMPLES", "0"))


def fixed_seed(test):
    return test if DEEP else seed(20250127)(test)


def both_paths(q, k, v, heads, bindings, base_attention=sdpa_attention, **kw):
    """Every method that takes these inputs: the C++ kernel takes fp32 only."""
    methods = EXACT_METHODS if q.dtype == torch.float32 else TORCH_METHODS
    return {
        m: nested_attention(q, k, v, heads, bindings, base_attention=base_attention, method=m, **kw) for m in methods
    }


def assert_close64(out, ref, tol=FP32_TOL, what=""):
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------------
# exactness against the per-query reference (fp32 in, fp64 reference)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_single_subject_matches_reference(method):
    q, k, v = random_qkv(2, 10, 20, heads=4, d=8)
    bind = make_binding(2, 20, 32, m=6, positions={0: [3], 1: [7]})
    out = nested_attention(q, k, v, 4, [bind], method=method)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close64(out, reference_nested(q, k, v, 4, [bind]))
    # and it really changed something: far from plain attention
    assert (out.double() - reference_plain(q, k, v, 4)).abs().max() > 1e-2


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_trigger_weight_matches_reference(method, weight):
    """log w is added to the trigger's outer logits; a masked subject weights only inside its mask."""
    q, k, v = random_qkv(3, 10, 20, heads=2, d=8, seed=5)
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3 + [0.5] * 2])
    binds = [
        make_binding(3, 20, 16, 4, {0: [3, 4], 1: [7]}, strength=0.8, trigger_weight=weight, seed=1),
        make_binding(3, 20, 16, 3, {0: [9], 2: [2]}, strength=0.6, query_mask=mask, trigger_weight=2.0, seed=2),
    ]
    out = nested_attention(q, k, v, 2, binds, method=method)
    assert_close64(out, reference_nested(q, k, v, 2, binds), what=method)
    unweighted = [NestedBinding(b.keys, b.values, b.where, b.strength, b.query_mask) for b in binds]
    assert (out - nested_attention(q, k, v, 2, unweighted, method=method)).abs().max() > 1e-3


def test_trigger_weight_moves_attention_to_the_trigger():
    """With strength 1 and a large weight, the trigger takes nearly all the outer attention: the output nears u(q)."""
    q, k, v = random_qkv(1, 6, 12, heads=1, d=8, seed=3)
    bind = make_binding(1, 12, 8, 4, {0: [5]}, trigger_weight=1e6)
    u = torch.softmax(q @ bind.keys.T / 8**0.5, -1) @ bind.values
    assert torch.allclose(nested_attention(q, k, v, 1, [bind], method="closed_form"), u, atol=1e-3)


def test_negative_trigger_weight_is_refused():
    q, k, v = random_qkv(1, 4, 6, heads=1, d=4)
    with pytest.raises(ValueError, match="trigger weight must be 0 or more"):
        nested_attention(q, k, v, 1, [make_binding(1, 6, 4, 2, {0: [1]}, trigger_weight=-1.0)])


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_decoupled_binding_adds_image_attention_on_its_rows(method):
    """IP-Adapter's decoupled attention: plain attention plus lam * softmax(q K~^T) V~ on the rows it binds."""
    q, k, v = random_qkv(2, 10, 20, heads=2, d=8, seed=7)
    ip = make_binding(2, 20, 16, 4, {1: [0]}, strength=0.7, decoupled=True, seed=3)
    nested = make_binding(2, 20, 16, 4, {0: [3], 1: [5]}, seed=4)
    out = nested_attention(q, k, v, 2, [ip, nested], method=method)
    assert_close64(out, reference_nested(q, k, v, 2, [ip, nested]), what=method)
    alone = nested_attention(q, k, v, 2, [ip], method=method)
    assert torch.equal(alone[0], sdpa_attention(q, k, v, 2)[0])  # row 0 has no subject
    total = sdpa_attention(q, k, v, 2) + nested_correction(q, k, v, 2, [ip, nested])
    assert_close64(total, reference_nested(q, k, v, 2, [ip, nested]), what="correction")


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_several_subjects_repeated_positions(method):
    """Three subjects; multi-BPE triggers (adjacent positions) and triggers repeated in a row."""
    b, t, heads, d = 3, 40, 2, 16
    q, k, v = random_qkv(b, 12, t, heads, d, seed=3)
    binds = [
        make_binding(b, t, heads * d, 4, {0: [2, 3], 1: [5, 6, 30, 31], 2: [10]}, seed=11),
        make_binding(b, t, heads * d, 3, {0: [8, 20, 21, 22], 2: [12, 13]}, seed=12, strength=0.6),
        make_binding(b, t, heads * d, 5, {1: [15]}, seed=13, strength=1.0),
    ]
    out = nested_attention(q, k, v, heads, binds, method=method)
    assert_close64(out, reference_nested(q, k, v, heads, binds))


@pytest.mark.parametrize("t,positions", [(154, {0: [80, 81], 1: [5, 77 + 5]}), (231, {0: [154 + 4], 1: [4, 81, 158]})])
@pytest.mark.parametrize("method", EXACT_METHODS)
def test_multi_chunk_contexts(t, positions, method):
    q, k, v = random_qkv(2, 16, t, heads=4, d=8, seed=t)
    bind = make_binding(2, t, 32, 16, positions, seed=t + 1)
    out = nested_attention(q, k, v, 4, [bind], method=method)
    assert_close64(out, reference_nested(q, k, v, 4, [bind]))


@pytest.mark.parametrize("mask_rows", [1, 3])
@pytest.mark.parametrize("method", EXACT_METHODS)
def test_query_masks(mask_rows, method):
    b, n, t = 3, 9, 30
    q, k, v = random_qkv(b, n, t, 3, 4, seed=5)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(mask_rows, n, generator=g)
    mask[:, 0] = 0.0  # exactly off
    mask[:, 1] = 1.0  # exactly on
    binds = [
        make_binding(b, t, 12, 4, {0: [1], 1: [4, 5], 2: [9]}, query_mask=mask, strength=0.8, seed=2),
        make_binding(b, t, 12, 2, {0: [20], 2: [21]}, query_mask=1 - mask, seed=3),
    ]
    out = nested_attention(q, k, v, 3, binds, method=method)
    assert_close64(out, reference_nested(q, k, v, 3, binds))


def test_query_mask_zero_equals_plain_for_that_query():
    q, k, v = random_qkv(1, 6, 10, 2, 4, seed=4)
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    bind = make_binding(1, 10, 8, 3, {0: [2]}, query_mask=mask)
    for out in both_paths(q, k, v, 2, [bind]).values():
        plain = sdpa_attention(q, k, v, 2)
        assert torch.allclose(out[:, 0::2], plain[:, 0::2], atol=1e-6)
        assert not torch.allclose(out[:, 1::2], plain[:, 1::2], atol=1e-3)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 1.5])
@pytest.mark.parametrize("method", EXACT_METHODS)
def test_strengths(lam, method):
    q, k, v = random_qkv(2, 8, 25, 2, 8, seed=6)
    bind = make_binding(2, 25, 16, 4, {0: [3, 4], 1: [10]}, strength=lam)
    out = nested_attention(q, k, v, 2, [bind], method=method)
    assert_close64(out, reference_nested(q, k, v, 2, [bind]))
    if lam == 0.0:
        assert torch.equal(out, sdpa_attention(q, k, v, 2))


def test_strength_is_linear_in_lambda():
    """The value change is affine in lam: out(lam) = out(0) + lam * (out(1) - out(0))."""
    q, k, v = random_qkv(1, 7, 12, 2, 4, seed=8)
    outs = {}
    for lam in (0.0, 1.0, 1.5, 2.0):
        outs[lam] = nested_attention(q, k, v, 2, [make_binding(1, 12, 8, 3, {0: [5]}, strength=lam)])
    for lam in (1.5, 2.0):
        assert torch.allclose(outs[lam], outs[0.0] + lam * (outs[1.0] - outs[0.0]), atol=1e-5)


def test_negative_strength_uses_closed_form():
    q, k, v = random_qkv(1, 5, 9, 1, 6, seed=10)
    bind = make_binding(1, 9, 6, 2, {0: [1]}, strength=-0.5)
    assert_close64(nested_attention(q, k, v, 1, [bind]), reference_nested(q, k, v, 1, [bind]))


def test_float64_inputs_are_exact():
    q, k, v = random_qkv(2, 8, 20, 2, 8, dtype=torch.float64, seed=12)
    binds = [make_binding(2, 20, 16, 4, {0: [3], 1: [4, 5]}, dtype=torch.float64, strength=0.7)]
    for cf, out in both_paths(q, k, v, 2, binds).items():
        assert out.dtype == torch.float64
        assert_close64(out, reference_nested(q, k, v, 2, binds), tol=1e-11, what=f"method={cf}")


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_overlapping_triggers_add_their_changes(method):
    """Two subjects sharing a position ("man" / "old man"): both paths give the additive formula."""
    q, k, v = random_qkv(2, 6, 10, 2, 4, seed=14)
    binds = [
        make_binding(2, 10, 8, 3, {0: [2, 3], 1: [4]}, strength=0.6, seed=1),
        make_binding(2, 10, 8, 3, {0: [3]}, strength=0.7, seed=2),
    ]
    assert_close64(nested_attention(q, k, v, 2, binds, method=method), reference_nested(q, k, v, 2, binds))


# ---------------------------------------------------------------------------------------------
# rows without the trigger: bit-identical to the base attention


def manual_base(q, k, v, heads):
    """A different (non-SDPA) base: explicit softmax with a visible extra term to prove it's used."""
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    p = torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, -1)
    return merge_heads(p @ vh) + 0.125


@pytest.mark.parametrize("base", [sdpa_attention, manual_base], ids=["sdpa", "custom"])
@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_untouched_rows_bit_identical(base, method, lam):
    b, t = 4, 20
    q, k, v = random_qkv(b, 11, t, 2, 8, seed=13)
    binds = [
        make_binding(b, t, 16, 3, {1: [2], 3: [5, 6]}, strength=lam, seed=1),
        make_binding(b, t, 16, 3, {1: [9]}, strength=0.5, seed=2),
    ]
    out = nested_attention(q, k, v, 2, binds, base_attention=base, method=method)
    ref_base = base(q, k, v, 2)
    for row in (0, 2):
        assert torch.equal(out[row], ref_base[row]), f"row {row} without trigger differs from base"
    assert not torch.allclose(out[1], ref_base[1], atol=1e-3)
    if base is sdpa_attention:
        assert_close64(out, reference_nested(q, k, v, 2, binds))
    elif method == "cpu_kernel":
        # the kernel computes bound rows whole, whatever the base
        assert_close64(out[[1, 3]], reference_nested(q, k, v, 2, binds)[[1, 3]])
    elif method == "closed_form" or lam > 1:
        # the closed form adds the correction to whatever the base returns
        assert_close64(out - 0.125, reference_nested(q, k, v, 2, binds))


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_untouched_rows_bit_identical_where_sdpa_is_not_batch_invariant(method):
    """CPU SDPA gives different bits for a row computed in a batch of 2 and alone (few queries,
    T=77); the untouched row must still equal the full-batch base."""
    q, k, v = random_qkv(2, 1, 77, 1, 8, seed=0)
    bind = make_binding(2, 77, 8, 2, {0: [4]})
    out = nested_attention(q, k, v, 1, [bind], method=method)
    assert torch.equal(out[1], sdpa_attention(q, k, v, 1)[1])


@pytest.mark.parametrize("base", [sdpa_attention, manual_base], ids=["sdpa", "custom"])
def test_no_trigger_anywhere_is_base(base):
    q, k, v = random_qkv(2, 5, 8, 2, 4)
    bind = make_binding(2, 8, 8, 3, {})
    for out in both_paths(q, k, v, 2, [bind], base_attention=base).values():
        assert torch.equal(out, base(q, k, v, 2))
    assert torch.equal(nested_attention(q, k, v, 2, [], base_attention=base), base(q, k, v, 2))


def test_sdpa_attention_is_plain_attention():
    q, k, v = random_qkv(2, 7, 9, 3, 5)
    assert_close64(sdpa_attention(q, k, v, 3), reference_plain(q, k, v, 3))


# ---------------------------------------------------------------------------------------------
# low precision: compared with the fp64 reference of the same low-precision inputs


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("method", TORCH_METHODS)
@pytest.mark.parametrize("lam", [0.4, 1.0, 1.5])
def test_low_precision(dtype, tol, method, lam):
    b, n, t, heads, d = 2, 32, 77, 4, 16
    q, k, v = random_qkv(b, n, t, heads, d, dtype=dtype, seed=21)
    mask = torch.rand(1, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    binds = [
        make_binding(b, t, heads * d, 16, {0: [4, 5], 1: [6]}, strength=lam, dtype=dtype, seed=1),
        make_binding(b, t, heads * d, 8, {0: [10]}, strength=min(lam, 1.0), query_mask=mask, dtype=dtype, seed=2),
    ]
    out = nested_attention(q, k, v, heads, binds, method=method)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = reference_nested(q, k, v, heads, binds)
    err = (out.double() - ref).abs().max().item()
    plain_err = (sdpa_attention(q, k, v, heads).double() - reference_plain(q, k, v, heads)).abs().max().item()
    assert err <= tol, f"{dtype}: error {err:.3g} (plain SDPA error {plain_err:.3g})"
    assert err <= 8 * plain_err + 1e-3, f"{dtype}: error {err:.3g} much above plain SDPA's {plain_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_untouched_rows_bit_identical(dtype):
    q, k, v = random_qkv(3, 8, 16, 2, 8, dtype=dtype)
    bind = make_binding(3, 16, 16, 4, {1: [3]}, dtype=dtype)
    for out in both_paths(q, k, v, 2, [bind]).values():
        base = sdpa_attention(q, k, v, 2)
        assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])


def test_large_logits_stay_finite():
    """Strongly peaked nested and outer logits (scale 8): no overflow, still exact."""
    q, k, v = random_qkv(2, 6, 20, 2, 8, seed=2, scale=3.0)
    bind = make_binding(2, 20, 16, 4, {0: [1], 1: [2, 3]}, key_scale=3.0)
    for cf, out in both_paths(q, k, v, 2, [bind]).items():
        assert torch.isfinite(out).all()
        assert_close64(out, reference_nested(q, k, v, 2, [bind]), tol=5e-5, what=f"method={cf}")


# ---------------------------------------------------------------------------------------------
# property tests


@st.composite
def problems(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    t = draw(st.sampled_from([1, 2, 5, 17, 77, 154]))
    heads = draw(st.integers(1, 4))
    d = draw(st.integers(1, 9))
    n_subjects = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    fused_range = draw(st.booleans())  # all strengths in [0, 1]: the fused path is taken
    free = list(range(t))
    binds = []
    g = torch.Generator().manual_seed(seed)
    for s in range(n_subjects):
        positions = {}
        rows = draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True))  # rows with this trigger
        for row in rows:
            if not free:
                break
            positions[row] = draw(st.lists(st.sampled_from(free), min_size=1, max_size=min(3, len(free)), unique=True))
        for row_pos in positions.values():
            free = [p for p in free if p not in row_pos]  # subjects use disjoint positions (distinct words)
        strength = draw(st.one_of(st.sampled_from([0.0, 0.3, 1.0, 1.5, 2.0]), st.floats(0.0, 2.0, allow_nan=False)))
        if fused_range:
            strength = min(strength, 1.0)
        mask = None
        mask_kind = draw(st.sampled_from(["none", "one", "batch"]))
        if mask_kind != "none":
            mask = torch.rand(1 if mask_kind == "one" else b, n, generator=g)
            mask[mask < 0.2] = 0.0
            mask[mask > 0.9] = 1.0
        m = draw(st.integers(1, 6))
        weight = draw(st.sampled_from([1.0, 1.0, 0.0, 0.5, 2.0, 4.0]))
        binds.append(
            make_binding(
                b, t, heads * d, m, positions, strength=strength, query_mask=mask, seed=seed + s, trigger_weight=weight
            )
        )
    q, k, v = random_qkv(b, n, t, heads, d, seed=seed)
    return q, k, v, heads, binds


PROPERTY = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@fixed_seed
@settings(max_examples=DEEP or 40, **PROPERTY)
@given(problems())
def test_property_matches_reference(problem):
    q, k, v, heads, binds = problem
    ref = reference_nested(q, k, v, heads, binds)
    plain = sdpa_attention(q, k, v, heads)
    untouched = ~torch.stack(
        [bd.where.any(-1) for bd in binds if bd.strength != 0] or [torch.zeros(q.shape[0], dtype=torch.bool)]
    ).any(0)
    for cf, out in both_paths(q, k, v, heads, binds).items():
        assert out.shape == q.shape
        assert_close64(out, ref, tol=2e-5, what=f"method={cf}")
        for row in untouched.nonzero()[:, 0].tolist():
            assert torch.equal(out[row], plain[row])


@fixed_seed
@settings(max_examples=DEEP or 15, **PROPERTY)
@given(problems())
def test_property_correction_plus_base(problem):
    q, k, v, heads, binds = problem
    total = sdpa_attention(q, k, v, heads) + nested_correction(q, k, v, heads, binds)
    assert_close64(total, reference_nested(q, k, v, heads, binds), tol=2e-5)


# ---------------------------------------------------------------------------------------------
# nested_correction and subject_maps


def test_nested_correction_plus_base_equals_nested_attention():
    q, k, v = random_qkv(2, 9, 30, 3, 4, seed=31)
    binds = [
        make_binding(2, 30, 12, 4, {0: [1, 2], 1: [29]}, strength=0.9),
        make_binding(2, 30, 12, 2, {1: [7]}, strength=1.7, seed=4),
    ]
    corr = nested_correction(q, k, v, 3, binds)
    assert corr.shape == q.shape
    assert torch.allclose(sdpa_attention(q, k, v, 3) + corr, nested_attention(q, k, v, 3, binds), atol=1e-5)
    # rows without any trigger get no correction at all
    empty = nested_correction(q, k, v, 3, [make_binding(2, 30, 12, 4, {0: [1]})])
    assert torch.count_nonzero(empty[1]) == 0


def test_nested_correction_in_query_chunks_is_the_same(monkeypatch):
    """Above CORRECTION_ELEMENTS outer probabilities the queries go in chunks, each with its slice of every
    query mask: the result is the unchunked one, with masks, trigger weights and a decoupled binding."""
    import na_engine.attention as attention

    q, k, v = random_qkv(2, 11, 30, 3, 4, seed=32)
    mask = torch.rand(2, 11, generator=torch.Generator().manual_seed(3))
    binds = [
        make_binding(2, 30, 12, 4, {0: [1, 2], 1: [29]}, strength=0.9, query_mask=mask, trigger_weight=3.0),
        make_binding(2, 30, 12, 2, {1: [7]}, strength=1.7, seed=4),
        make_binding(2, 30, 12, 3, {0: [5]}, query_mask=mask[:1], seed=5, decoupled=True),
    ]
    whole = nested_correction(q, k, v, 3, binds)
    monkeypatch.setattr(attention, "CORRECTION_ELEMENTS", 2 * 3 * 30 * 4)  # chunks of 4 queries: 4, 4, 3
    chunked = nested_correction(q, k, v, 3, binds)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    assert (whole.abs() > 1e-4).any()


def test_subject_maps():
    b, n, t, heads, d, m = 3, 10, 20, 2, 8, 5
    q, k, v = random_qkv(b, n, t, heads, d, seed=41)
    bind = make_binding(b, t, heads * d, m, {0: [3, 4], 2: [7]})
    maps = subject_maps(q, k, heads, bind)
    assert (
        maps.outer.shape == (b, n)
        and maps.token.shape == (b, n)
        and maps.weights.shape == (b, n, m)
        and maps.entropy.shape == (b, n)
    )
    qh, kh = split_heads(q.double(), heads), split_heads(k.double(), heads)
    p = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, -1)
    expected_outer = torch.stack([p[row][..., bind.where[row]].sum(-1).mean(0) for row in range(b)])
    assert torch.allclose(maps.outer.double(), expected_outer, atol=1e-6)
    assert torch.count_nonzero(maps.outer[1]) == 0
    # weights: a distribution over the M tokens where there is a trigger, zero elsewhere
    assert torch.allclose(maps.weights[[0, 2]].sum(-1), torch.ones(2, n), atol=1e-6)
    assert torch.count_nonzero(maps.weights[1]) == 0 and torch.count_nonzero(maps.entropy[1]) == 0
    assert ((maps.entropy[[0, 2]] >= 0) & (maps.entropy[[0, 2]] <= math.log(m) + 1e-6)).all()
    assert torch.equal(maps.token[[0, 2]], maps.weights[[0, 2]].argmax(-1))
    # weights are the head-averaged nested softmax
    nk = split_heads(bind.keys.double()[None], heads)[0]
    w = torch.softmax(torch.einsum("bhnd,hmd->bhnm", qh, nk) / d**0.5, -1).mean(1)
    assert torch.allclose(maps.weights[0].double(), w[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# validation and memory


def test_shape_errors():
    q, k, v = random_qkv(2, 5, 8, 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        nested_attention(q, k, v, 3, [])
    with pytest.raises(ValueError, match="nested keys"):
        nested_attention(q, k, v, 2, [make_binding(2, 8, 6, 3, {0: [1]})])
    with pytest.raises(ValueError, match="trigger mask"):
        nested_attention(q, k, v, 2, [make_binding(2, 9, 8, 3, {0: [1]})])
    with pytest.raises(ValueError, match="query mask"):
        nested_attention(q, k, v, 2, [make_binding(2, 8, 8, 3, {0: [1]}, query_mask=torch.ones(1, 4))])


def test_non_contiguous_inputs():
    """q/k/v may arrive as views (e.g. a slice of a fused qkv projection)."""
    q, k, v = random_qkv(2, 6, 10, 2, 4, seed=50)
    qkv_q = torch.cat([q, q], -1)[..., :8]
    assert not qkv_q.is_contiguous()
    bind = make_binding(2, 10, 8, 3, {0: [2], 1: [3]})
    for cf, out in both_paths(qkv_q, k, v, 2, [bind]).items():
        assert_close64(out, reference_nested(q, k, v, 2, [bind]), what=f"method={cf}")


def _largest_allocation(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_memory_never_materialises_per_query_values():
    """B*H*N*T*d fp32 would be 2.5 GB here; every method must stay O(B*H*N*(T+M)) and fast."""
    b, n, t, heads, d, m = 1, 4096, 260, 8, 64, 16
    per_query_values = b * heads * n * t * d * 4
    assert per_query_values > 2 * 1024**3
    q, k, v = random_qkv(b, n, t, heads, d, seed=60)
    bind = make_binding(b, t, heads * d, m, {0: [5, 6, 82]})
    logits = b * heads * n * (t + m) * 4
    for method in EXACT_METHODS:
        start = time.perf_counter()
        biggest = _largest_allocation(lambda method=method: nested_attention(q, k, v, heads, [bind], method=method))
        elapsed = time.perf_counter() - start
        assert 0 < biggest < per_query_values / 8, f"method={method}: an allocation of {biggest / 2**20:.0f} MiB"
        assert biggest <= 2 * logits, f"method={method}: {biggest / 2**20:.0f} MiB vs logits {logits / 2**20:.0f} MiB"
        assert elapsed < 20


def test_closed_form_gradients_match_reference():
    """Training backpropagates through the closed form into the nested keys/values and queries."""
    q, k, v = random_qkv(2, 5, 12, 2, 4, dtype=torch.float64, seed=70)
    bind = make_binding(2, 12, 8, 3, {0: [2, 3], 1: [7]}, dtype=torch.float64, strength=0.8)
    target = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda *a: nested_attention(*a, method="closed_form"), reference_nested):
        leaves = [t.clone().requires_grad_(True) for t in (q, bind.keys, bind.values)]
        b = NestedBinding(leaves[1], leaves[2], bind.where, bind.strength)
        (fn(leaves[0], k, v, 2, [b]) * target).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_many_nested_tokens(method):
    """More tokens than SMALL_M (several photos concatenated): u(q) comes from an SDPA call."""
    q, k, v = random_qkv(2, 12, 20, 2, 8, seed=70)
    binds = [make_binding(2, 20, 16, 70, {0: [3, 4], 1: [9]}, strength=0.8, seed=71)]
    assert_close64(nested_attention(q, k, v, 2, binds, method=method), reference_nested(q, k, v, 2, binds))


# -- the method table: one test per rule of auto -------------------------------------------------


def _case(rows=(True, True), strength=1.0, dtype=torch.float32, device="cpu", training=False, keys=3):
    from na_engine.attention import Case

    q = torch.zeros(len(rows), 4, 8, dtype=dtype, device=device)
    where = torch.zeros(len(rows), 3, dtype=torch.bool)
    where[list(rows), 1] = True
    binding = NestedBinding(torch.zeros(2, 8), torch.zeros(2, 8), where, strength)
    return Case(q, [binding], torch.tensor(rows), training, keys)


def test_auto_takes_the_cpu_kernel_when_every_row_is_bound_in_fp32_inference():
    from na_engine.attention import choose_method

    assert choose_method("auto", _case()) == "cpu_kernel"
    assert choose_method("auto", _case(strength=1.7)) == "cpu_kernel"  # the kernel takes any strength
    assert choose_method("auto", _case(rows=(False, True))) != "cpu_kernel"  # SDPA runs on the plain row anyway
    assert choose_method("auto", _case(dtype=torch.float64)) != "cpu_kernel"
    assert choose_method("auto", _case(keys=1536)) == "statistics"  # a joint sequence: the kernel is slower there


def test_auto_takes_the_closed_form_under_autograd_and_for_general_strengths():
    from na_engine.attention import choose_method

    assert choose_method("auto", _case(training=True)) == "closed_form"
    assert choose_method("auto", _case(rows=(False, True), strength=1.5)) == "closed_form"
    assert choose_method("auto", _case(rows=(False, True), strength=-0.5)) == "closed_form"
    assert choose_method("fused", _case(strength=2.0)) == "closed_form"  # fused cannot express it


def test_auto_takes_statistics_on_cpu_and_fused_elsewhere():
    from na_engine.attention import choose_method

    assert choose_method("auto", _case(rows=(False, True))) == "statistics"
    assert choose_method("auto", _case(rows=(False, True), device="meta")) == "fused"
    assert choose_method("statistics", _case()) == "statistics"  # an explicit choice is honoured where it applies
