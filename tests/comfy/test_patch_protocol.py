"""na_engine.hosts.comfy_patch: the attn2 replace and model wrapper, driven the way ComfyUI drives them (no ComfyUI)."""

import copy
import logging

import pytest
import torch
from engine_builders import TINY_RESAMPLER, reference_nested, tiny_layers

from na_engine.adapter import random_adapter
from na_engine.attention import NestedBinding, nested_attention, nested_correction, sdpa_attention
from na_engine.capture import AttentionCapture, token_legend
from na_engine.hosts.comfy_patch import ROWS_KEY, NestedAttentionPatch, NestedRun, plan_registration
from na_engine.subjects import Subject

L, D, HEAD_DIM = 77, 24, 8
LATENT = (5, 7)  # grids 5x7 (35 queries) and 3x4 (12 queries)
LAYERS = tiny_layers((32, 64, 64, 32))  # ("input",1,0) ("middle",0,0) ("middle",0,1) ("output",3,0)
EXTRA = ("output", 4, 0)  # a model layer the adapter has no projections for
MODEL_KEYS = [layer.comfy for layer in LAYERS] + [EXTRA]
WIDTH = {**{layer.comfy: layer.width for layer in LAYERS}, EXTRA: 32}
QUERIES = {("input", 1, 0): 35, ("middle", 0, 0): 12, ("middle", 0, 1): 12, ("output", 3, 0): 35, EXTRA: 35}
POSITIONS = [[5, 6], [10]]  # subject 0: a two-token trigger; subject 1: one token


class FakeUNet:
    """Per layer: q from the latent (so it depends on the input), k/v projected from the context."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.wq = {key: torch.randn(4, WIDTH[key], generator=g) for key in MODEL_KEYS}
        self.bias = {key: torch.randn(QUERIES[key], WIDTH[key], generator=g) for key in MODEL_KEYS}
        self.wk = {key: torch.randn(D, WIDTH[key], generator=g) * D**-0.5 for key in MODEL_KEYS}
        self.wv = {key: torch.randn(D, WIDTH[key], generator=g) * D**-0.5 for key in MODEL_KEYS}
        self.replace = {}  # ComfyUI's patches_replace["attn2"]
        self.seen = []

    def qkv(self, key, x, context):
        n = QUERIES[key]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (1, n)).flatten(2).transpose(1, 2)  # (B, n, 4)
        q = pooled @ self.wq[key] + self.bias[key]
        return q, context @ self.wk[key], context @ self.wv[key]

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        """What ComfyUI's UNet does at every attn2: look the replace up by (block, id, index), then (block, id)."""
        options = dict(transformer_options or {})
        outputs = {}
        for key in MODEL_KEYS:
            q, k, v = self.qkv(key, x, c_crossattn)
            heads = WIDTH[key] // HEAD_DIM
            extra = {
                **options,
                "n_heads": heads,
                "block": key[:2],
                "block_index": key[2],
                "sigmas": t,
                "cond_or_uncond": options.get("cond_or_uncond", []),
            }
            patch = self.replace.get(key) or self.replace.get(key[:2])
            outputs[key] = patch(q, k, v, extra) if patch is not None else sdpa_attention(q, k, v, heads)
            self.seen.append(extra)
        return outputs

    def base(self, x, context):
        outputs = {}
        for key in MODEL_KEYS:
            q, k, v = self.qkv(key, x, context)
            outputs[key] = sdpa_attention(q, k, v, WIDTH[key] // HEAD_DIM)
        return outputs


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(TINY_RESAMPLER, LAYERS, seed=4)


def make_subjects(adapter, mask=None, strengths=(1.0, 1.0)):
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randn(TINY_RESAMPLER.num_queries, TINY_RESAMPLER.output_dim, generator=g) for _ in range(2)]
    return [
        Subject(tokens[0], adapter, "dog", strengths[0]),
        Subject(tokens[1], adapter, "cat", strengths[1], mask=mask),
    ]


def contexts(seed=1):
    """(1, L, D) ours; batch [uncond, ours x2, another prompt, ours x2] at T = 2L; rows 1 and 3 are ours."""
    g = torch.Generator().manual_seed(seed)
    ours = torch.randn(1, L, D, generator=g)
    uncond = torch.randn(1, L, D, generator=g).repeat(1, 2, 1)
    other = torch.cat([ours, torch.randn(1, L, D, generator=g)], 1)  # shares our first chunk, must not bind
    batch = torch.cat([uncond, ours.repeat(1, 2, 1), other, ours.repeat(1, 2, 1)], 0)
    return ours, batch


def register(unet, run, existing=None):
    existing = dict(existing or {})
    unet.replace = dict(existing)
    patches = {}
    for layer, key, previous in plan_registration(existing, MODEL_KEYS):
        patch = NestedAttentionPatch(run, layer, previous)
        unet.replace[key] = patch
        patches[layer] = patch
    return patches


def call(unet, run, sigma=5.0, batch=None, x=None, seed=3, previous=None, schedule=None):
    """One model call; ``schedule``: the run's sigmas, as current ComfyUI's samplers put them in
    transformer_options["sample_sigmas"]."""
    _, ctx = contexts()
    ctx = ctx if batch is None else batch
    b = ctx.shape[0]
    x = torch.randn(b, 4, *LATENT, generator=torch.Generator().manual_seed(seed)) if x is None else x
    args = {
        "input": x,
        "timestep": torch.full((b,), sigma),
        "c": {"c_crossattn": ctx, "transformer_options": {"cond_or_uncond": [1, 0, 0, 0][:b]}},
        "cond_or_uncond": [1, 0, 0, 0][:b],
    }
    if schedule is not None:
        args["c"]["transformer_options"]["sample_sigmas"] = schedule
    return run.wrapper(previous)(unet.apply_model, args), x, ctx


def expected_bindings(adapter, subjects, key, batch, rows=(1, 3), strength=1.0, n=None):
    index = adapter.layer_index(key)
    out = []
    for subject, pos in zip(subjects, POSITIONS):
        k, v = adapter.nested_kv(index, subject.tokens)
        where = torch.zeros(batch, 2 * L, dtype=torch.bool)
        for row in rows:
            where[row, pos] = True
            where[row, [p + L for p in pos]] = True
        mask = None
        if subject.mask is not None:
            from na_engine.masks import query_mask

            mask = query_mask(subject.mask, LATENT, n)
        out.append(NestedBinding(k, v, where, strength * subject.strength, mask))
    return out


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.5, 1.5)])
def test_only_our_rows_change(adapter, strengths):
    subjects = make_subjects(adapter, strengths=strengths)
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, strength=1.0, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run)
    outputs, x, ctx = call(unet, run)
    base = unet.base(x, ctx)
    for key in MODEL_KEYS:
        out = outputs[key]
        for row in (0, 2):
            assert torch.equal(out[row], base[key][row]), (key, row)
        if key == EXTRA:
            assert torch.equal(out, base[key])
            continue
        q, k, v = unet.qkv(key, x, ctx)
        heads = WIDTH[key] // HEAD_DIM
        binds = expected_bindings(adapter, subjects, key, 4)
        ref = reference_nested(q, k, v, heads, binds)
        assert (out.double() - ref).abs().max() < 1e-5, key
        assert torch.allclose(out, nested_attention(q, k, v, heads, binds), atol=1e-6)
        assert (out[[1, 3]] - base[key][[1, 3]]).abs().max() > 1e-3
    assert run.fired == {layer.comfy: 1 for layer in LAYERS}


def test_tiled_positions_matter(adapter):
    """Binding only the first copy of the tiled context would be wrong: the reference needs idx + L."""
    subjects = make_subjects(adapter)
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run)
    outputs, x, ctx = call(unet, run)
    key = ("input", 1, 0)
    q, k, v = unet.qkv(key, x, ctx)
    binds = expected_bindings(adapter, subjects, key, 4)
    for b in binds:
        b.where[:, L:] = False
    assert (outputs[key].double() - reference_nested(q, k, v, 4, binds)).abs().max() > 1e-4


def test_untiled_and_triple_tiled_context(adapter):
    subjects = make_subjects(adapter)
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    bound = run.bind_rows(ours, torch.tensor([5.0]), LATENT)
    assert [p.where.nonzero()[:, 1].tolist() for p in bound.placements] == POSITIONS
    triple = torch.cat([torch.zeros(1, 3 * L, D), ours.repeat(1, 3, 1)])
    bound = run.bind_rows(triple, torch.tensor([5.0, 5.0]), LATENT)
    assert bound.placements[0].where[0].sum() == 0
    assert bound.placements[0].where[1].nonzero()[:, 0].tolist() == [5, 6, 82, 83, 159, 160]
    assert run.bind_rows(torch.zeros(1, L + 3, D), torch.tensor([5.0]), LATENT) is None
    assert run.bind_rows(None, torch.tensor([5.0]), LATENT) is None


@pytest.mark.parametrize("sigma", [20.0, 0.5])
def test_sigma_gating(adapter, sigma):
    subjects = make_subjects(adapter)
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run)
    outputs, x, ctx = call(unet, run, sigma=sigma)
    base = unet.base(x, ctx)
    for key in MODEL_KEYS:
        assert torch.equal(outputs[key], base[key]), key
    assert run.fired == {}
    inside, _, _ = call(unet, run, sigma=10.0)  # the range is inclusive
    assert not torch.equal(inside[("input", 1, 0)], base[("input", 1, 0)])


def test_query_mask_and_run_strength(adapter):
    mask = torch.zeros(40, 56)
    mask[:, :28] = 1.0
    subjects = make_subjects(adapter, mask=mask, strengths=(1.0, 0.9))
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, strength=1.3, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run)
    outputs, x, ctx = call(unet, run)
    for key in (("input", 1, 0), ("middle", 0, 1)):
        q, k, v = unet.qkv(key, x, ctx)
        binds = expected_bindings(adapter, subjects, key, 4, strength=1.3, n=QUERIES[key])
        assert binds[1].query_mask.shape == (1, QUERIES[key])
        ref = reference_nested(q, k, v, WIDTH[key] // HEAD_DIM, binds)
        assert (outputs[key].double() - ref).abs().max() < 1e-5, key


def test_plan_registration():
    layers = [("input", 1, 0), ("middle", 0, 0), ("middle", 0, 1), ("output", 3, 0)]
    plan = plan_registration({}, layers)
    assert plan == [
        (("input", 1, 0), ("input", 1), None),
        (("middle", 0, 0), ("middle", 0, 0), None),
        (("middle", 0, 1), ("middle", 0, 1), None),
        (("output", 3, 0), ("output", 3), None),
    ]
    f, g, h = object(), object(), object()
    plan = plan_registration({("input", 1): f, ("middle", 0, 1): g, ("middle", 0): h}, layers)
    assert plan == [
        (("input", 1, 0), ("input", 1), f),  # take over the short key, calling the old replace
        (("middle", 0, 0), ("middle", 0, 0), h),  # depth 2: the full key, wins ComfyUI's lookup
        (("middle", 0, 1), ("middle", 0, 1), g),  # the full key wins over the short one
        (("output", 3, 0), ("output", 3), None),
    ]
    sdxl_like = [("input", 4, 0), ("input", 4, 1)]
    assert [key for _, key, _ in plan_registration({}, sdxl_like)] == sdxl_like


# -- stacking with IPAdapter-style replaces ------------------------------------------------------


class ForeignReplace:
    """A replace with the Attn2Replace protocol of IPAdapter_plus/InstantID/PuLID (written from its description)."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [], []
        if callback is not None:
            self.add(callback, **kwargs)

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = sdpa_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"].reshape(-1)[0]) if "sigmas" in extra_options else 1e9
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out


def ip_callback(seed):
    g = torch.Generator().manual_seed(seed)
    ip_tokens = {
        key: (torch.randn(4, WIDTH[key], generator=g), torch.randn(4, WIDTH[key], generator=g)) for key in MODEL_KEYS
    }
    calls = []

    def callback(out, q, k, v, extra_options, weight=1.0, **kwargs):
        key = (*extra_options["block"], extra_options["block_index"])
        ik, iv = ip_tokens[key]
        b = q.shape[0]
        calls.append(key)
        return weight * sdpa_attention(
            q, ik[None].expand(b, -1, -1), iv[None].expand(b, -1, -1), extra_options["n_heads"]
        )

    callback.calls = calls
    return callback


def _stacked(adapter, order, sigma=5.0, ip_range=(10.0, 0.0)):
    subjects = make_subjects(adapter, strengths=(1.0, 1.4))
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    callback = ip_callback(11)
    kwargs = dict(weight=0.7, sigma_start=ip_range[0], sigma_end=ip_range[1])
    if order == "ip_first":
        existing = {}
        for _, key, _ in plan_registration({}, MODEL_KEYS):  # IPAdapter registers SD1.5-like short keys too
            existing[key] = ForeignReplace(callback, **kwargs)
        register(unet, run, existing)
    else:
        register(unet, run)
        for key in MODEL_KEYS:  # IPAdapter applied after us: finds our replace and add()s to it
            found = unet.replace.get(key) or unet.replace.get(key[:2])
            assert isinstance(found, NestedAttentionPatch)
            found.add(callback, **kwargs)
    outputs, x, ctx = call(unet, run, sigma=sigma)
    return outputs, x, ctx, unet, subjects, callback


@pytest.mark.parametrize("sigma,ip_on", [(5.0, True), (12.0, False)])
def test_stacking_both_orders(adapter, sigma, ip_on):
    ip_range = (10.0, 0.0) if ip_on else (3.0, 0.0)
    first, x, ctx, unet, subjects, cb1 = _stacked(adapter, "ip_first", sigma=5.0, ip_range=ip_range)
    second, x2, ctx2, _, _, cb2 = _stacked(adapter, "ours_first", sigma=5.0, ip_range=ip_range)
    assert torch.equal(x, x2) and torch.equal(ctx, ctx2)
    assert sorted(cb1.calls) == sorted(cb2.calls) == (sorted(MODEL_KEYS) if ip_on else [])
    ip = ip_callback(11)
    for key in MODEL_KEYS:
        q, k, v = unet.qkv(key, x, ctx)
        heads = WIDTH[key] // HEAD_DIM
        expected = sdpa_attention(q, k, v, heads)
        if ip_on:
            expected = expected + ip(
                None, q, k, v, {"block": key[:2], "block_index": key[2], "n_heads": heads}, weight=0.7
            )
        if key != EXTRA:
            expected = expected + nested_correction(q, k, v, heads, expected_bindings(adapter, subjects, key, 4))
        assert torch.allclose(first[key], second[key], atol=2e-5), key
        assert torch.allclose(first[key], expected, atol=2e-5), key
        assert torch.allclose(second[key], expected, atol=2e-5), key


def test_added_callback_sigma_gating(adapter):
    """A callback add()ed to our patch follows its own sigma_start/sigma_end."""
    outputs, x, ctx, unet, subjects, callback = _stacked(adapter, "ours_first", sigma=5.0, ip_range=(4.0, 0.0))
    assert callback.calls == []


def test_two_runs_stack(adapter):
    """Two Nested Attention patches in a row (e.g. two patch nodes): corrections add up."""
    ours, _ = contexts()
    subjects = make_subjects(adapter)
    run1 = NestedRun(subjects[:1], POSITIONS[:1], ours, sigma_range=(10.0, 1.0))
    run2 = NestedRun(subjects[1:], POSITIONS[1:], ours, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run1)
    existing = dict(unet.replace)
    for layer, key, previous in plan_registration(existing, MODEL_KEYS):
        unet.replace[key] = NestedAttentionPatch(run2, layer, previous)
    _, ctx = contexts()
    x = torch.randn(4, 4, *LATENT, generator=torch.Generator().manual_seed(3))
    args = {
        "input": x,
        "timestep": torch.full((4,), 5.0),
        "c": {"c_crossattn": ctx, "transformer_options": {}},
        "cond_or_uncond": [1, 0, 0, 0],
    }
    outputs = run2.wrapper(run1.wrapper())(unet.apply_model, args)
    assert set(unet.seen[-1][ROWS_KEY]) == {run1.uid, run2.uid}
    key = ("input", 1, 0)
    q, k, v = unet.qkv(key, x, ctx)
    ref = reference_nested(q, k, v, 4, expected_bindings(adapter, subjects, key, 4))
    assert (outputs[key].double() - ref).abs().max() < 1e-5


def test_wrapper_chains_previous_and_leaves_args(adapter):
    ours, ctx = contexts()
    run = NestedRun(make_subjects(adapter), POSITIONS, ours, sigma_range=(10.0, 1.0))
    options = {"cond_or_uncond": [1, 0, 0, 0], "other": 1}
    args = {
        "input": torch.zeros(4, 4, *LATENT),
        "timestep": torch.full((4,), 5.0),
        "c": {"c_crossattn": ctx, "transformer_options": options},
        "cond_or_uncond": [1, 0, 0, 0],
    }
    seen = {}

    def previous(apply_model, a):
        seen.update(a)
        return "from previous"

    assert run.wrapper(previous)(None, args) == "from previous"
    bound = seen["c"]["transformer_options"][ROWS_KEY][run.uid]
    assert (
        bound.latent_hw == LATENT
        and [p.where.any(-1).tolist() for p in bound.placements] == [[False, True, False, True]] * 2
    )
    assert seen["c"]["transformer_options"]["other"] == 1
    assert ROWS_KEY not in options and ROWS_KEY not in args["c"]["transformer_options"]  # caller's dicts untouched


def test_warns_once_when_prompt_unmatched(adapter, caplog):
    ours, _ = contexts()
    run = NestedRun(make_subjects(adapter), POSITIONS, ours, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run)
    strangers = torch.randn(4, 2 * L, D)
    with caplog.at_level(logging.WARNING, logger="nested_attention"):
        outputs, x, ctx = call(unet, run, batch=strangers)
        call(unet, run, batch=strangers)
    assert sum("no positive batch row" in r.getMessage() for r in caplog.records) == 1
    base = unet.base(x, ctx)
    assert all(torch.equal(outputs[key], base[key]) for key in MODEL_KEYS)


# -- copies and caches ----------------------------------------------------------------------------


def test_deepcopy_shares_run_and_weights(adapter):
    ours, _ = contexts()
    run = NestedRun(make_subjects(adapter), POSITIONS, ours)
    previous = ForeignReplace()
    patch = NestedAttentionPatch(run, ("input", 1, 0), previous)
    patch.add(ip_callback(1), weight=1.0, sigma_start=9.0, sigma_end=0.0)
    model_options = {"transformer_options": {"patches_replace": {"attn2": {("input", 1): patch, ("output", 3): patch}}}}
    clone_options = copy.deepcopy(model_options)
    replaces = clone_options["transformer_options"]["patches_replace"]["attn2"]
    clone = replaces[("input", 1)]
    assert clone is not patch and replaces[("output", 3)] is clone  # one object stays one object
    assert clone.run is run and clone.previous is previous
    assert clone.run.subjects[0].adapter is adapter and clone.run.context is ours
    assert clone.run.subjects[0].tokens.data_ptr() == run.subjects[0].tokens.data_ptr()
    clone.add(ip_callback(2), weight=0.5, sigma_start=9.0, sigma_end=0.0)
    assert len(patch.callback) == 1 and len(clone.callback) == 2
    assert patch.kwargs == [dict(weight=1.0, sigma_start=9.0, sigma_end=0.0)]


def test_nested_kv_cached_per_device_and_dtype(adapter, monkeypatch):
    subjects = make_subjects(adapter)
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    calls = []
    original = adapter.nested_kv

    def counting(layer, tokens):
        calls.append(layer)
        return original(layer, tokens)

    monkeypatch.setattr(adapter, "nested_kv", counting)
    unet = FakeUNet()
    register(unet, run)
    call(unet, run)
    first = len(calls)
    assert first == 2 * len(LAYERS)  # two subjects, each adapter layer once
    call(unet, run, seed=9)
    call(unet, run, sigma=2.0)
    assert len(calls) == first
    # another dtype: one more computation per (subject, layer), then cached again
    key = ("middle", 0, 0)
    q, k, v = (t.double() for t in unet.qkv(key, torch.randn(4, 4, *LATENT), contexts()[1]))
    bound = run.bind_rows(contexts()[1].double(), torch.full((4,), 5.0), LATENT)
    binds = run.binder.bindings(bound, key, q)
    assert binds[0][1].keys.dtype == torch.float64 and len(calls) == first + 2
    run.binder.bindings(bound, key, q)
    assert len(calls) == first + 2


# -- capture ---------------------------------------------------------------------------------------


def test_capture_and_render(adapter):
    g = torch.Generator().manual_seed(0)
    subjects = make_subjects(adapter)
    legend = token_legend(torch.rand(TINY_RESAMPLER.num_queries, 257, generator=g), torch.rand(20, 30, 3, generator=g))
    assert legend.shape == (20, 30, 3)
    capture = AttentionCapture([None, legend])
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0), capture=capture)
    unet = FakeUNet()
    register(unet, run)
    with pytest.raises(Exception, match="No attention was captured"):
        capture.render(torch.rand(2, 16, 24, 3))
    call(unet, run, sigma=5.0)
    call(unet, run, sigma=3.0)
    assert set(capture.outer) == {0, 1} and set(capture.tokens) == {0, 1}
    assert capture.outer[0].shape == (2, 1, *LATENT)  # our two rows, at the latent grid
    assert capture.tokens[1].shape == (2, TINY_RESAMPLER.num_queries, *LATENT)
    assert capture.calls == 2 * 2 * len(LAYERS)
    assert (capture.outer[0] > 0).all()
    images = torch.rand(2, 16, 24, 3, generator=g)
    panels = capture.render(images)
    assert panels.shape == (2 * 2, 16, 3 * 24, 3)
    assert panels.min() >= 0 and panels.max() <= 1 and torch.isfinite(panels).all()
    assert torch.count_nonzero(panels[:2, :, 48:]) == 0  # subject 0 has no legend: black third panel
    assert torch.count_nonzero(panels[2:, :, 48:]) > 0
    # a new sampling run (sigma goes up again) starts a fresh capture
    call(unet, run, sigma=9.0)
    assert capture.calls == 2 * len(LAYERS)


def test_capture_holds_one_sampling_run_where_the_sampler_gives_its_schedule(adapter):
    """A one-step sampler queued twice (the same sigma both times), or a run after one interrupted in its first
    step, starts a fresh capture: each sampling gives its own schedule tensor; calls of one run add up."""
    capture = AttentionCapture([None, None])
    run = NestedRun(make_subjects(adapter), POSITIONS, contexts()[0], sigma_range=(10.0, 1.0), capture=capture)
    unet = FakeUNet()
    register(unet, run)
    first = torch.tensor([5.0, 0.0])
    call(unet, run, sigma=5.0, schedule=first)
    one_run = capture.calls
    assert one_run == 2 * len(LAYERS)
    call(unet, run, sigma=5.0, schedule=torch.tensor([5.0, 0.0]))  # queued again: a new schedule tensor
    assert capture.calls == one_run
    two_steps = torch.tensor([5.0, 3.0, 0.0])
    call(unet, run, sigma=5.0, schedule=two_steps)
    call(unet, run, sigma=3.0, schedule=two_steps)
    assert capture.calls == 2 * one_run


def test_per_image_mask_with_cfg_batch(adapter):
    """A (B, H, W) mask for B=2 latents while the model batch is [uncond x2, cond x2]: row r uses mask r % 2."""
    masks = torch.zeros(2, 40, 56)
    masks[0, :, :28] = 1.0  # image 0: left half
    masks[1, :, 28:] = 1.0  # image 1: right half
    subjects = make_subjects(adapter, mask=masks)
    ours, _ = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    unet = FakeUNet()
    register(unet, run)
    uncond = torch.randn(2, 2 * L, D, generator=torch.Generator().manual_seed(5))
    batch = torch.cat([uncond, ours.repeat(2, 2, 1)])  # rows 2, 3 are ours: images 0 and 1
    outputs, x, ctx = call(unet, run, batch=batch)
    from na_engine.masks import query_mask

    key = ("input", 1, 0)
    q, k, v = unet.qkv(key, x, ctx)
    binds = expected_bindings(adapter, subjects, key, 4, rows=(2, 3), n=QUERIES[key])
    binds[1].query_mask = query_mask(masks, LATENT, QUERIES[key])[[0, 1, 0, 1]]
    ref = reference_nested(q, k, v, 4, binds)
    assert (outputs[key].double() - ref).abs().max() < 1e-5


def test_mask_batch_that_fits_no_row_layout(adapter):
    from na_engine.errors import NestedAttentionError

    subjects = make_subjects(adapter, mask=torch.ones(3, 10, 14))
    ours, ctx = contexts()
    run = NestedRun(subjects, POSITIONS, ours, sigma_range=(10.0, 1.0))
    bound = run.bind_rows(ctx, torch.full((4,), 5.0), LATENT, halves=2)  # 2 latent images, CFG's 2 halves
    with pytest.raises(NestedAttentionError, match="holds 3 images, but 2 latent images are being sampled"):
        run.binder.bindings(bound, ("input", 1, 0), torch.randn(4, 35, 32))
