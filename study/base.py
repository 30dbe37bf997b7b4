"""The miniature base: a text-to-image latent diffusion model trained from scratch on the world.

Three models, trained in two steps and saved as one diffusers SD1.5-layout folder, which
`python -m na_engine train|generate --base FOLDER` read unchanged:
- vae/: a small AutoencoderKL, 64 px -> 16 x 16 x 4 latents (trained first, on renders alone);
- text_encoder/ + tokenizer/: a small CLIPTextModel over a word-level BPE vocabulary of the world;
- unet/: a UNet2DConditionModel with cross-attention at every level, v-prediction, cosine schedule.
The text encoder is trained jointly with the UNet (a frozen random one hardly conditions it,
shared/research/feasibility.md), then frozen with it.

Beside the denoising loss, a localisation loss (after FastComposer's) makes each class word attend to its
own product: in every cross-attention layer, the word's attention share on the product's pixels must be at
least LOCALISE_RATIO times its share elsewhere (a hinge, so the other words keep their share of the product).
Nested attention scales its correction by that share, so without it a subject has little leverage and two
subjects cannot be told apart. The folder's na_engine.json records that the UNet was trained on the VAE
posterior's mean, which `python -m na_engine train` then follows.

The base never sees a product of the study: it learns to draw products in general from its own
(BaseConfig.products), as a real base has seen many objects but not the user's, and half of its captions
describe their look (world.appearance), so that its class word's state carries what a product looks like.
Since round 6 it draws some of its own products far more often than the rest (BaseConfig.familiar_share): the
encoders train on those beside new ones, to test whether nested needs a base that knows its training products.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import world

# Every word the world's captions use; other words fall back to letters (e.g. "photo").
WORDS = [
    "a", "an", "and", "on", "of", "the", "in", "background", "photo", "with", "cap", "lit", "from", "lying",
    *world.KINDS, *world.BACKGROUNDS, *world.PLACEMENTS, *world.SIZES, *world.PATTERN_WORDS.values(),
    *world.HUE_WORDS, *world.INK_WORDS, *world.BUILD_WORDS, *world.DENSITY_WORDS,
]  # fmt: skip
PUNCTUATION = [","]


@dataclass
class BaseConfig:
    resolution: int = 64
    images: int = 8000  # renders of its own products; 1/4 of them two-product scenes
    products: int = 3000  # its own products (world seed PRODUCTS_SEED), none of the study's; 0: the train identities
    vae_steps: int = 1500  # on half-size crops: the VAE is convolutional
    vae_widths: tuple = (16, 32, 64)
    unet_steps: int = 5000
    unet_widths: tuple = (32, 64, 128)
    text_width: int = 64
    batch: int = 32
    lr: float = 4e-4
    caption_dropout: float = 0.1
    ema: float = 0.999
    localise: float = 0.05  # weight of the localisation loss; 0 = off
    share_cases: int = 48  # held-out prompts on which the class words' attention shares are measured
    described: float = 0.5  # share of the products whose caption names their look (round 2: 0)
    max_tokens: int = 48  # the captions' token length (round 2: 32, which cut some two-product captions)
    familiar_per_kind: int = 40  # the first of its own products of each kind, which it draws more often
    familiar_share: float = 0.6  # of the renders, the share whose first product is a familiar one (round 5: 0)
    seed: int = 0

    @classmethod
    def from_record(cls, record: dict) -> "BaseConfig":
        """The configuration a stage record holds; a field added since means what the record's run did without it."""
        return cls(**{**BEFORE, **record})


BEFORE = {"familiar_share": 0.0}  # fields added after a committed run, at the value that run had in effect


QUICK = BaseConfig(
    images=96,
    products=40,
    vae_steps=20,
    vae_widths=(8, 16, 16),
    unet_steps=20,
    unet_widths=(16, 32, 32),
    batch=8,
    share_cases=2,
    familiar_per_kind=4,
)


# -- tokenizer ----------------------------------------------------------------------------------


def _bpe(parts: list, ranks: dict) -> list:
    """``parts`` merged as CLIP's BPE merges a word: the best-ranked adjacent pair first, every occurrence of it."""
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if tuple(parts[i : i + 2]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def write_tokenizer(folder: str, words, punctuation=(), max_length: int = 32) -> None:
    """A CLIP BPE tokenizer in which each of ``words`` is one token; other words fall back to letters.

    Each word gets the merges it still needs after those of the words before it, appended last: a merge ranked
    after every earlier one never fires inside a word already whole, and an earlier merge that cuts into this
    word (the "o n</w>" of "on" inside "lemon") is merged on from rather than undone."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab, ranks = {}, {}
    for sym in ["!", *letters, *(f"{c}</w>" for c in letters), *(f"{p}</w>" for p in punctuation)]:
        vocab[sym] = len(vocab)
    for word in words:
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks.setdefault((parts[0], parts[1]), len(ranks))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = _bpe(parts, ranks)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in ranks) + "\n")
    CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length).save_pretrained(folder)


# The world seed of the base's own products: none is a train or held-out identity of the study (WORLD_SEED 0).
PRODUCTS_SEED = 1
# The localisation loss is zero once a word's share on its product is this many times its share elsewhere.
LOCALISE_RATIO = 4.0
LATENTS = "mean"  # what the UNet is trained on: the VAE posterior's mean (recorded in na_engine.json)


# -- data ----------------------------------------------------------------------------------------


@dataclass
class RenderSet:
    images: torch.Tensor  # (n, 3, R, R) float in [-1, 1]
    captions: list
    masks: torch.Tensor  # (n, 2, r, r) float in [0, 1]: each product's coverage at the latent grid (0 = no product)
    kinds: list  # per image, its products' class words in order


def training_scenes(
    identities, count: int, seed: int, described: float = 0.0, familiar=(), familiar_share: float = 0.0
) -> list[world.Scene]:
    """The scenes of ``count`` training renders: one product, or two of different kinds (1 in 4); the first product
    is one of ``familiar`` in ``familiar_share`` of them, else any; each product's caption names its appearance
    with probability ``described`` (drawn apart: the scenes stay). Share 0 draws exactly what it drew before."""
    rng, words = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    favour = np.random.default_rng([seed, 2])  # its own stream, so that share 0 leaves the scenes as they were
    scenes = []
    for _ in range(count):
        pool = familiar if len(familiar) and familiar_share and favour.random() < familiar_share else identities
        first = pool[int(rng.integers(len(pool)))]
        second = None
        if rng.random() < 0.25:
            others = [x for x in identities if x.kind != first.kind]
            second = others[int(rng.integers(len(others)))]
        scene = world.random_scene(rng, first, second)
        said = words.random(len(scene.products)) < described
        scenes.append(
            world.Scene(scene.background, [replace(p, described=bool(d)) for p, d in zip(scene.products, said)])
        )
    return scenes


def render_set(scenes: list, resolution: int, latent: int | None = None) -> RenderSet:
    """The renders of ``scenes`` (training_scenes) with captions and per-product masks."""
    latent = latent or resolution // 4
    count = len(scenes)
    images, captions, kinds = np.empty((count, resolution, resolution, 3), np.uint8), [], []
    masks = np.zeros((count, 2, latent, latent), np.float32)
    for i, scene in enumerate(scenes):
        images[i] = np.asarray(world.render(scene, resolution)[0])
        captions.append(world.caption(scene))
        kinds.append([p.identity.kind for p in scene.products])
        for k, mask in enumerate(world.product_masks(scene, resolution)):
            masks[i, k] = np.asarray(mask.resize((latent, latent), resample=Image.BOX), np.float32) / 255
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return RenderSet(pixels, captions, torch.from_numpy(masks), kinds)


def own_products(cfg: BaseConfig, train_ids) -> list:
    """The products the base's renders are drawn from: its own (world seed PRODUCTS_SEED), or the train identities."""
    return world.sample_identities(PRODUCTS_SEED, cfg.products) if cfg.products else list(train_ids)


def familiar_products(cfg: BaseConfig, train_ids) -> list:
    """The own products the base draws more often (none where it draws the train identities, as in round 3)."""
    own = own_products(cfg, train_ids) if cfg.products else []
    return [i for kind in world.KINDS for i in [p for p in own if p.kind == kind][: cfg.familiar_per_kind]]


def base_scenes(cfg: BaseConfig, train_ids) -> list[world.Scene]:
    """The scenes of the base's training renders."""
    familiar = familiar_products(cfg, train_ids)
    return training_scenes(
        own_products(cfg, train_ids), cfg.images, cfg.seed, cfg.described, familiar, cfg.familiar_share
    )


def renders_per_product(cfg: BaseConfig, train_ids) -> dict:
    """{index in own_products: how many of the base's training renders show it}; products never drawn are absent."""
    counts: dict = {}
    for scene in base_scenes(cfg, train_ids):
        for p in scene.products:
            counts[p.identity.index] = counts.get(p.identity.index, 0) + 1
    return counts


def word_positions(tokenizer, ids: torch.Tensor, kinds: list) -> torch.Tensor:
    """(n, 2) long: the token position of each image's products' class words in its caption ids; -1 = none."""
    out = torch.full((len(kinds), 2), -1, dtype=torch.long)
    for i, words in enumerate(kinds):
        for k, word in enumerate(words):
            found = (ids[i] == tokenizer.convert_tokens_to_ids(word + "</w>")).nonzero()
            out[i, k] = int(found[0, 0]) if len(found) else -1
    return out


# -- cross-attention recording -------------------------------------------------------------------


class CrossAttentionMaps:
    """A diffusers attention processor for the UNet's cross-attention layers that computes attention
    explicitly and, while ``recording``, keeps each layer's probabilities averaged over heads, (B, N, T)."""

    def __init__(self):
        self.recording, self.maps, self.names = False, {}, {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))  # (B, h, N or T, d)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (B, h, N, T)
        if self.recording:
            self.maps.setdefault(self.names[id(attn)], []).append(probs.mean(1))
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))

    def install(self, unet) -> "CrossAttentionMaps":
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                self.names[id(module)] = name
                module.set_processor(self)
        return self

    def take(self) -> dict:
        """The maps recorded since the last take: layer name -> a list of (B, N, T), one per call."""
        maps, self.maps = self.maps, {}
        return maps


def word_shares(probs: torch.Tensor, positions: torch.Tensor, masks: torch.Tensor):
    """One layer's class-word shares: probs (B, N, T), positions (B, K) (-1 = none), masks (B, K, r, r) ->
    (share on the product's pixels, share elsewhere), each (B, K), weighted by the mask's coverage at the layer."""
    side = int(round(probs.shape[1] ** 0.5))
    m = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (B, K, N)
    p = probs.gather(2, positions.clamp(min=0)[:, None, :].expand(-1, probs.shape[1], -1)).transpose(1, 2)  # (B, K, N)
    inside = (p * m).sum(-1) / m.sum(-1).clamp(min=1e-6)
    outside = (p * (1 - m)).sum(-1) / (1 - m).sum(-1).clamp(min=1e-6)
    return inside, outside


def localisation_loss(maps: list, positions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over layers and products of the hinge log(LOCALISE_RATIO) - log(share on / share off), floored at 0."""
    valid = positions >= 0  # (B, K)
    if not bool(valid.any()):
        return torch.zeros(())
    losses = []
    for layer in maps.values():
        for probs in layer:
            inside, outside = word_shares(probs, positions, masks)
            gap = math.log(LOCALISE_RATIO) - (torch.log(inside + 1e-4) - torch.log(outside + 1e-4))
            losses.append(F.relu(gap)[valid].mean())
    return torch.stack(losses).mean()


# -- models --------------------------------------------------------------------------------------


def make_vae(cfg: BaseConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_widths)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_widths,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=cfg.resolution,
        mid_block_add_attention=False,
    )


def make_text_encoder(cfg: BaseConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    )


def make_unet(cfg: BaseConfig, latent: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_widths)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=cfg.unet_widths,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=tuple(max(1, w // 16) for w in cfg.unet_widths),  # heads: 16 channels each
        norm_num_groups=8,
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,  # as DDIM expects of it (otherwise diffusers warns at every sampling)
    )


# -- training ------------------------------------------------------------------------------------


def _batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (batch,), generator=g)


def _lr(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def latent_means(vae, images: torch.Tensor) -> torch.Tensor:
    """(n, 3, R, R) in [-1, 1] -> (n, 4, r, r): the VAE posterior's means (unscaled), 256 images at a time."""
    return torch.cat([vae.encode(part).latent_dist.mean for part in images.split(256)])


def train_vae(cfg: BaseConfig, images: torch.Tensor, log) -> tuple:
    """Reconstruction (L1 + MSE) with a small KL term, on random half-size crops.

    Returns (vae, every image's scaled latent mean, PSNR of 256 whole renders)."""
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for step, idx in enumerate(_batches(len(images), cfg.batch, cfg.vae_steps, cfg.seed)):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, 1e-3, warmup=50)
        crop = cfg.resolution // 2
        top, left = (int(v) for v in torch.randint(cfg.resolution - crop + 1, (2,), generator=g))
        x = images[idx, :, top : top + crop, left : left + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = latent_means(vae, images)
        recon = vae.decode(latents[:256]).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (images[:256] + 1) / 2).item()
    scale = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return vae, latents * scale, 10 * math.log10(1 / max(mse, 1e-12))


def train_unet(cfg: BaseConfig, latents: torch.Tensor, renders: RenderSet, tokenizer, log):
    """The UNet and the text encoder together on v-prediction (plus the localisation loss); returns their EMA
    copies and the last 100 steps' mean losses."""
    torch.manual_seed(cfg.seed + 1)
    text = make_text_encoder(cfg, tokenizer)
    unet = make_unet(cfg, latents.shape[-1])
    scheduler = make_scheduler()
    ids = tokenizer(list(renders.captions), padding="max_length", truncation=True, return_tensors="pt").input_ids
    positions = word_positions(tokenizer, ids, renders.kinds)  # (n, 2)
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids  # (1, T)
    tail = {"denoise": [], "localise": []}
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    maps = CrossAttentionMaps().install(unet)  # the live UNet only: the EMA copy keeps diffusers' processors
    maps.recording = cfg.localise > 0
    g = torch.Generator().manual_seed(cfg.seed + 2)
    t0 = time.time()
    for step, idx in enumerate(_batches(len(latents), cfg.batch, cfg.unet_steps, cfg.seed + 3)):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.unet_steps, cfg.lr)
        x0 = latents[idx]
        tok = ids[idx].clone()
        dropped = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        tok[dropped] = empty[0]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text(tok)[0]).sample
        denoise = F.mse_loss(pred, scheduler.get_velocity(x0, noise, t))
        loss = denoise
        if cfg.localise > 0:
            where = positions[idx].masked_fill(dropped[:, None], -1)
            localise = localisation_loss(maps.take(), where, renders.masks[idx])
            loss = loss + cfg.localise * localise
            tail["localise"].append(localise.item())
        tail["denoise"].append(float(denoise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            extra = f" localise {tail['localise'][-1]:.4f}" if tail["localise"] else ""
            log(f"unet step {step} loss {denoise.item():.4f}{extra} ({time.time() - t0:.0f} s)")
    maps.recording = False
    losses = {name: round(float(np.mean(v[-100:])), 5) for name, v in tail.items() if v}
    return ema_unet.eval(), ema_text.eval(), scheduler, losses


def save_pipeline(folder: str, vae, text, unet, scheduler, cfg: BaseConfig) -> None:
    """A diffusers SD1.5-layout folder beside its tokenizer/ (fp16 weights: half the size; the commands load fp32)."""
    unet.half().save_pretrained(os.path.join(folder, "unet"))
    vae.half().save_pretrained(os.path.join(folder, "vae"))
    text.half().save_pretrained(os.path.join(folder, "text_encoder"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(folder, "study_base.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    with open(os.path.join(folder, "na_engine.json"), "w") as f:  # read by python -m na_engine train|generate
        json.dump({"latents": LATENTS, "resolution": cfg.resolution}, f, indent=1)


@torch.no_grad()
def trigger_shares(
    folder: str, identities, count: int, seed: int, steps: int = 20, guidance: float = 4.0, attributes: bool = True
) -> dict:
    """The class word's attention share on its product's pixels and elsewhere, in every cross-attention layer,
    while the saved base draws one-product prompts of ``identities`` (the prompt scene's mask marks the product).
    Shares are means over the layer's sampling steps, its queries and the cases; 'product' and 'elsewhere' are
    their means over layers."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from na_engine.families.unet import load_base

    base = load_base(folder)
    maps = CrossAttentionMaps().install(base.unet)
    pipe = StableDiffusionPipeline(
        base.vae, base.text_encoders[0], base.tokenizers[0], base.unet,
        DDIMScheduler.from_config(base.scheduler.config), None, None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    tokenizer, latent = base.tokenizers[0], int(base.unet.config.sample_size)
    resolution = latent * pipe.vae_scale_factor
    rng = np.random.default_rng(seed)
    sums: dict = {}
    for k in range(count):
        scene = world.random_scene(rng, identities[k % len(identities)], attributes=attributes)
        caption = world.caption(scene)
        ids = tokenizer([caption], padding="max_length", truncation=True, return_tensors="pt").input_ids
        positions = word_positions(tokenizer, ids, [[scene.products[0].identity.kind]])[:, :1]  # (1, 1)
        mask = world.product_masks(scene, resolution)[0].resize((latent, latent), resample=Image.BOX)
        masks = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]  # (1, 1, r, r)
        maps.recording = True
        pipe(caption, num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
             generator=torch.Generator().manual_seed(seed + k), output_type="latent")  # fmt: skip
        maps.recording = False
        for name, calls in maps.take().items():
            shares = [word_shares(probs[-1:], positions, masks) for probs in calls]  # the conditional row
            inside, outside = (float(torch.stack([s[i] for s in shares]).mean()) for i in (0, 1))
            total = sums.setdefault(name, [0.0, 0.0])
            total[0], total[1] = total[0] + inside / count, total[1] + outside / count
    layers = {name: {"product": round(a, 4), "elsewhere": round(b, 4)} for name, (a, b) in sums.items()}
    return {
        "product": round(float(np.mean([v["product"] for v in layers.values()])), 4),
        "elsewhere": round(float(np.mean([v["elsewhere"] for v in layers.values()])), 4),
        "layers": layers,
        "n": count,
    }


def build_base(folder: str, train_ids, heldout, cfg: BaseConfig, log=print) -> dict:
    """Render, train the VAE, then the UNet with the text encoder; save the folder; measure the class words'
    attention shares on held-out products. Returns the stage's record."""
    from transformers import CLIPTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    renders = render_set(base_scenes(cfg, train_ids), cfg.resolution)
    log(f"rendered {len(renders.images)} training images in {time.time() - t0:.0f} s")
    vae, latents, psnr = train_vae(cfg, renders.images, log)
    log(f"vae: reconstruction PSNR {psnr:.1f} dB, latents {tuple(latents.shape[1:])}")
    tok_dir = os.path.join(folder, "tokenizer")
    write_tokenizer(tok_dir, WORDS, PUNCTUATION, cfg.max_tokens)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet, text, scheduler, losses = train_unet(cfg, latents, renders, tokenizer, log)
    save_pipeline(folder, vae, text, unet, scheduler, cfg)
    shares = trigger_shares(folder, heldout, cfg.share_cases, cfg.seed + 4)
    log(f"class-word share: {shares['product']:.3f} on the product, {shares['elsewhere']:.3f} elsewhere")
    return {
        "vae_psnr_db": round(psnr, 2),
        "trigger_share": shares,
        "final_losses": losses,
        "seconds": round(time.time() - t0, 1),
        "config": asdict(cfg),
    }
