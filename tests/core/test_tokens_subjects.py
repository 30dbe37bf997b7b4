"""na_engine.tokens, na_engine.subjects and na_engine.masks."""

import json

import pytest
import torch
from engine_builders import TINY_RESAMPLER, tiny_layers
from safetensors import safe_open
from safetensors.torch import save_file

from na_engine.adapter import random_adapter
from na_engine.errors import NestedAttentionError
from na_engine.masks import query_mask, token_grid, upsample
from na_engine.subjects import SUBJECT_FORMAT, Subject, SubjectSet, load_subject, save_subject
from na_engine.tokens import BOS, EOS, find_trigger, word_ids

# Hand-made ComfyUI tokenizer output (CLIP BPE ids as in research/comfyui.md §3):
# "a photo of sks dog, (red hat:1.2)" -> BOS a photo of sks dog , red hat EOS pad...
A, PHOTO, OF, SKS, DOG, COMMA, RED, HAT = 320, 1125, 539, 48136, 1929, 267, 736, 3801


def chunk(tokens, weights=None, word_id=False, pad=EOS):
    """One 77-token chunk: BOS, the tokens, EOS, padding; (id, weight) or (id, weight, word_id)."""
    weights = weights or [1.0] * len(tokens)
    body = [(BOS, 1.0)] + list(zip(tokens, weights)) + [(EOS, 1.0)]
    body += [(pad, 1.0)] * (77 - len(body))
    assert len(body) == 77
    if word_id:
        body = [(t, w, i if 0 < i <= len(tokens) else 0) for i, (t, w) in enumerate(body)]
    return body


PROMPT = "a photo of sks dog, (red hat:1.2)"
EXAMPLE = chunk([A, PHOTO, OF, SKS, DOG, COMMA, RED, HAT], [1.0] * 6 + [1.2, 1.2])


@pytest.mark.parametrize("word_id", [False, True])
def test_single_token_trigger(word_id):
    chunks = [chunk([A, PHOTO, OF, SKS, DOG, COMMA, RED, HAT], [1.0] * 6 + [1.2, 1.2], word_id=word_id)]
    assert find_trigger(chunks, [SKS], "sks", PROMPT) == [4]
    assert find_trigger(chunks, [DOG], "dog", PROMPT) == [5]


def test_weighted_trigger_is_found():
    assert find_trigger([EXAMPLE], [RED], "red", PROMPT) == [7]  # weight 1.2
    assert find_trigger([EXAMPLE], [RED, HAT], "red hat", PROMPT) == [7, 8]


def test_multi_bpe_trigger_needs_all_tokens():
    chunks = [chunk([A, 4000, 4001, OF, 4000, DOG])]
    assert find_trigger(chunks, [4000, 4001], "zorbly", "a zorbly of zorb dog") == [2, 3]
    with pytest.raises(NestedAttentionError):
        find_trigger([chunk([A, 4000, DOG, 4001])], [4000, 4001], "zorbly", "a zorb dog ly")


def test_repeated_trigger():
    chunks = [chunk([A, DOG, OF, A, DOG, 4000, 4001, DOG])]
    assert find_trigger(chunks, [DOG], "dog", "a dog of a dog xx dog") == [2, 5, 8]
    chunks = [chunk([4000, 4001, A, 4000, 4001])]
    assert find_trigger(chunks, [4000, 4001], "zorbly", "zorbly a zorbly") == [1, 2, 4, 5]


def test_trigger_in_second_and_third_chunk():
    first = chunk([A] * 75)
    second = chunk([PHOTO] * 20 + [SKS, DOG])  # sks at position 21 of chunk 2
    third = chunk([SKS])
    assert find_trigger([first, second], [SKS], "sks", "long prompt") == [77 + 21]
    assert find_trigger([first, second, third], [SKS], "sks", "long prompt") == [98, 154 + 1]
    assert find_trigger([first, second], [SKS, DOG], "sks dog", "long") == [98, 99]


def test_sdxl_g_chunks_pad_with_zero():
    g = chunk([A, PHOTO, OF, SKS, DOG], pad=0)
    assert find_trigger([g], [SKS], "sks", "a photo of sks dog") == [4]


def test_embedding_slots_never_match():
    embedding = torch.zeros(768)
    c = chunk([A, PHOTO, SKS])
    c[2] = (embedding, 1.0)
    assert find_trigger([c], [SKS], "sks", "a embedding:x sks") == [3]


def test_absent_trigger_quotes_prompt():
    with pytest.raises(NestedAttentionError) as err:
        find_trigger([EXAMPLE], [4242], "person", "A photo of SKS dog, (red hat:1.2)")
    msg = str(err.value)
    assert "'person'" in msg
    assert '"a photo of sks dog red hat 1 2"' in msg
    assert "a photo of a person" in msg


def test_empty_trigger_ids():
    with pytest.raises(NestedAttentionError, match="has no tokens"):
        find_trigger([EXAMPLE], [], "", PROMPT)


@pytest.mark.parametrize("word_id", [False, True])
def test_word_ids(word_id):
    assert word_ids(chunk([4000, 4001], word_id=word_id)) == [4000, 4001]
    assert word_ids(chunk([DOG], word_id=word_id)) == [DOG]
    assert word_ids(chunk([], word_id=word_id)) == []
    assert word_ids([4000, 4001]) == [4000, 4001]  # ids without BOS/EOS
    assert word_ids([BOS, 7, EOS, 0, 0]) == [7]


def test_word_ids_feed_find_trigger():
    ids = word_ids(chunk([SKS]))
    assert find_trigger([EXAMPLE], ids, "sks", PROMPT) == [4]
    with pytest.raises(NestedAttentionError, match="no tokens"):
        find_trigger([EXAMPLE], word_ids(chunk([])), " ", PROMPT)


# -- subjects --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(TINY_RESAMPLER, tiny_layers(), seed=1)


def subject(adapter, trigger, **kw):
    return Subject(torch.randn(TINY_RESAMPLER.num_queries, TINY_RESAMPLER.output_dim), adapter, trigger, **kw)


def test_subject_set_accepts_distinct(adapter):
    a, b = subject(adapter, "man"), subject(adapter, "woman")
    s = SubjectSet([a, b])
    assert isinstance(s, tuple) and len(s) == 2 and s[0] is a and s[1] is b
    assert len(SubjectSet()) == 0


@pytest.mark.parametrize("second", ["dog", "Dog", " DOG "])
def test_subject_set_rejects_duplicates(adapter, second):
    with pytest.raises(NestedAttentionError) as err:
        SubjectSet([subject(adapter, "dog"), subject(adapter, second)])
    assert repr(second) in str(err.value) and "own word" in str(err.value)


@pytest.mark.parametrize("trigger", ["", "   "])
def test_subject_set_rejects_empty(adapter, trigger):
    with pytest.raises(NestedAttentionError, match="empty trigger"):
        SubjectSet([subject(adapter, trigger)])


def test_subject_with_(adapter):
    s = subject(adapter, "cat")
    t = s.with_(strength=0.5)
    assert t.strength == 0.5 and s.strength == 1.0 and t.tokens is s.tokens


def test_save_load_subject_round_trip(tmp_path, adapter):
    s = subject(
        adapter,
        "person",
        strength=0.75,
        token_attention=torch.rand(TINY_RESAMPLER.num_queries, 257),
        reference=torch.rand(32, 24, 3),
        source={"images": 2, "combine": "concat", "adapter": "mine.safetensors"},
    )
    path = str(tmp_path / "sub" / "person.safetensors")
    save_subject(s, path, "mine.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[SUBJECT_FORMAT])
    assert meta["format"] == SUBJECT_FORMAT and meta["adapter_name"] == "mine.safetensors"
    asked = []

    def find(name):
        asked.append(name)
        return adapter

    loaded = load_subject(path, find)
    assert asked == ["mine.safetensors"]
    assert torch.equal(loaded.tokens, s.tokens)
    assert torch.equal(loaded.token_attention, s.token_attention)
    assert torch.equal(loaded.reference, s.reference)
    assert loaded.trigger == "person" and loaded.strength == 0.75 and loaded.adapter is adapter
    assert loaded.source == s.source and loaded.mask is None


def test_save_load_subject_without_optional(tmp_path, adapter):
    s = subject(adapter, "dog")
    path = str(tmp_path / "dog.safetensors")
    save_subject(s, path, "mine.safetensors")
    loaded = load_subject(path, lambda name: adapter)
    assert torch.equal(loaded.tokens, s.tokens) and loaded.token_attention is None and loaded.reference is None


def test_subject_fingerprint_mismatch(tmp_path, adapter):
    s = subject(adapter, "dog")
    path = str(tmp_path / "dog.safetensors")
    save_subject(s, path, "mine.safetensors")
    other = random_adapter(TINY_RESAMPLER, tiny_layers(), seed=2)
    assert other.fingerprint() != adapter.fingerprint()
    with pytest.raises(NestedAttentionError) as err:
        load_subject(path, lambda name: other)
    assert "dog.safetensors" in str(err.value) and "mine.safetensors" in str(err.value) and "again" in str(err.value)


def test_fingerprint_covers_every_layer(tmp_path, adapter):
    """A change in any layer, here one middle to_v scaled by -3, is caught when a saved subject is loaded."""
    import copy

    path = str(tmp_path / "dog.safetensors")
    save_subject(subject(adapter, "dog"), path, "mine.safetensors")
    edited = copy.deepcopy(adapter)
    with torch.no_grad():
        edited.to_v[len(edited.layers) // 2].weight.mul_(-3)
    with pytest.raises(
        NestedAttentionError,
        match=r"dog.safetensors was encoded with a different mine.safetensors.*"
        r"Encode the subject again",
    ):
        load_subject(path, lambda name: edited)
    assert load_subject(path, lambda name: adapter).trigger == "dog"


def test_subject_saved_by_the_first_version_asks_to_encode_again(tmp_path, adapter):
    import json

    from safetensors import safe_open

    path = str(tmp_path / "old.safetensors")
    save_subject(subject(adapter, "dog"), path, "mine.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["nested_attention_subject"]), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={"nested_attention_subject": json.dumps({**meta, "version": 1})})
    with pytest.raises(NestedAttentionError, match=r"old.safetensors was saved by an earlier version.*Encode"):
        load_subject(path, lambda name: adapter)


def test_non_subject_files(tmp_path, adapter):
    plain = str(tmp_path / "plain.safetensors")
    save_file({"tokens": torch.zeros(2, 2)}, plain)
    with pytest.raises(NestedAttentionError, match="not a saved Nested Attention subject"):
        load_subject(plain, lambda name: adapter)
    broken = str(tmp_path / "broken.safetensors")
    with open(broken, "wb") as f:
        f.write(b"\x00" * 40)
    with pytest.raises(NestedAttentionError, match="broken.safetensors"):
        load_subject(broken, lambda name: adapter)
    with pytest.raises(NestedAttentionError, match="missing.safetensors"):
        load_subject(str(tmp_path / "missing.safetensors"), lambda name: adapter)


def test_fingerprint_is_stable_and_content_based(adapter):
    assert adapter.fingerprint() == adapter.fingerprint()
    assert random_adapter(TINY_RESAMPLER, tiny_layers(), seed=1).fingerprint() == adapter.fingerprint()
    assert len(adapter.fingerprint()) == 16


# -- masks ---------------------------------------------------------------------------------------


def test_token_grid_odd_latent():
    assert token_grid((13, 17), 13 * 17) == (13, 17)
    assert token_grid((13, 17), 7 * 9) == (7, 9)
    assert token_grid((13, 17), 4 * 5) == (4, 5)
    assert token_grid((13, 17), 2 * 3) == (2, 3)
    assert token_grid((128, 128), 4096) == (64, 64)
    assert token_grid((128, 96), 32 * 24) == (32, 24)
    with pytest.raises(NestedAttentionError, match="13x17"):
        token_grid((13, 17), 50)
    # very wide latents: the height reaches 1 before the width does
    assert token_grid((2, 16), 8) == (1, 8)
    assert token_grid((2, 16), 4) == (1, 4)
    assert token_grid((16, 2), 4) == (4, 1)


@pytest.mark.parametrize("mask_hw", [(13, 17), (104, 136), (7, 3), (1, 1), (512, 300)])
def test_query_mask_any_size(mask_hw):
    for n in (13 * 17, 7 * 9, 4 * 5):  # the tokens of three UNet levels of a 13x17 latent
        ones = query_mask(torch.ones(mask_hw), (13, 17), n)
        assert ones.shape == (1, n) and torch.allclose(ones, torch.ones(1, n))
        zeros = query_mask(torch.zeros(2, *mask_hw), (13, 17), n)
        assert zeros.shape == (2, n) and torch.count_nonzero(zeros) == 0


def test_query_mask_places_regions():
    mask = torch.zeros(104, 136)
    mask[:, :68] = 1.0  # the left half of the image
    m = query_mask(mask, (13, 17), 7 * 9).view(7, 9)
    assert (m[:, :3] > 0.99).all() and (m[:, -3:] < 0.01).all()
    assert ((m >= 0) & (m <= 1)).all()
    over = query_mask(mask * 3 - 1, (13, 17), 20)  # out-of-range input is clamped
    assert over.min() >= 0 and over.max() <= 1


def test_upsample_to_latent():
    maps = torch.arange(20.0).view(1, 20)
    up = upsample(maps, (13, 17))
    assert up.shape == (1, 1, 13, 17)
    same = upsample(torch.rand(2, 13 * 17, 3), (13, 17))
    assert same.shape == (2, 3, 13, 17)


def test_a_subject_file_without_its_adapter_name_is_a_clear_error(tmp_path, adapter):
    """A subject file whose metadata lost its adapter_name (edited, or written by another tool)."""
    import json

    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "dog.safetensors")
    save_subject(subject(adapter, "dog"), path, "mine.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[SUBJECT_FORMAT])
    del meta["adapter_name"]
    save_file(load_file(path), path, metadata={SUBJECT_FORMAT: json.dumps(meta)})
    with pytest.raises(NestedAttentionError, match=r"dog.safetensors lacks adapter_name .*Encode the subject again"):
        load_subject(path, lambda name: adapter)
