"""The miniature base: a text-to-image latent diffusion model trained from scratch on the world, saved as one
diffusers SD1.5-layout folder that `python -m na_engine train|generate --base FOLDER` read unchanged.

- vae/: a small AutoencoderKL, 32 px -> 16 x 16 x 4 latents, trained first on the train products' renders (the
  world's colours are flat, so it can be near-lossless; R0 reads through it);
- text_encoder/ + tokenizer/: a small CLIPTextModel over a word-level vocabulary of the world;
- unet/: a UNet2DConditionModel, v-prediction, cosine schedule, cross-attention at 8 x 8 and 4 x 4 only (at
  16 x 16 its attention would take most of the step's time on this CPU), trained with the text encoder.

Captions name the product's look (world.caption described) in a share of the renders, say only its kind in the
rest, or nothing (for guidance). A localisation loss (after FastComposer's) makes each class word attend to its
own product: nested attention scales its correction by that word's attention share, so without it a subject
would have little leverage. Training checkpoints every Config.checkpoint_every steps (safetensors and JSON) and
resumes from the last one.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import world
from .config import Config

LOCALISE_RATIO = 4.0  # the localisation loss is zero once a word's share on its product is this many times elsewhere
LATENT = 16  # the latent grid: RESOLUTION / 2


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


def write_tokenizer(folder: str, words, max_length: int) -> None:
    """A CLIP BPE tokenizer in which each of ``words`` is one token; other words fall back to letters.

    Each word gets the merges it still needs after those of the words before it, appended last: a merge ranked
    after every earlier one never fires inside a word already whole, and an earlier merge that cuts into this
    word is merged on from rather than undone."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab, ranks = {}, {}
    for sym in ["!", *letters, *(f"{c}</w>" for c in letters)]:
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


MAX_TOKENS = 32  # the longest caption (two described products) is 27 tokens with its start and end


# -- data ----------------------------------------------------------------------------------------


class Renders:
    """The base's training set: ``per_product`` random scenes of each product (one in five with a second
    product of another kind), rendered once, with each image's product masks at the latent grid."""

    def __init__(self, products, per_product: int, seed: int):
        rng = np.random.default_rng(seed)
        self.scenes = []
        for product in products:
            for _ in range(per_product):
                second = None
                if rng.random() < 0.2:
                    others = [p for p in products if p.kind != product.kind]
                    second = others[int(rng.integers(len(others)))]
                self.scenes.append(world.random_scene(rng, product, second))
        images = np.stack([world.render(scene, rng) for scene in self.scenes])  # (n, R, R, 3) uint8
        self.pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, R, R)
        self.masks = torch.from_numpy(np.stack([_masks(scene, image) for scene, image in zip(self.scenes, images)]))

    def __len__(self) -> int:
        return len(self.scenes)

    def captions(self, index: torch.Tensor, g: torch.Generator, cfg: Config) -> list[str]:
        """A caption per image: its look said (described_share), only its kinds, or nothing (empty_share)."""
        draw = torch.rand(len(index), generator=g).tolist()
        out = []
        for i, u in zip(index.tolist(), draw):
            if u < cfg.empty_share:
                out.append("")
            else:
                out.append(world.caption(self.scenes[i], described=u < cfg.empty_share + cfg.described_share))
        return out


def _masks(scene: world.Scene, image: np.ndarray) -> np.ndarray:
    """(2, LATENT, LATENT) float: each product's coverage of the latent cells; the second is zero for one product."""
    out = np.zeros((2, LATENT, LATENT), np.float32)
    pool = world.RESOLUTION // LATENT
    for k, mask in enumerate(world.product_masks(scene, image)):
        out[k] = mask.reshape(LATENT, pool, LATENT, pool).mean((1, 3))
    return out


def word_positions(tokenizer, ids: torch.Tensor, scenes: list) -> torch.Tensor:
    """(n, 2) long: the token position of each image's products' class words in its caption ids; -1 = none (an
    empty caption). A scene's two products are of two kinds, so each class word is found once."""
    out = torch.full((len(scenes), 2), -1, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for k, placed in enumerate(scene.products):
            found = (ids[i] == tokenizer.convert_tokens_to_ids(placed.product.kind + "</w>")).nonzero()
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


def make_autoencoder(cfg: Config):
    from diffusers import AutoencoderKL

    n = len(cfg.ae_widths)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.ae_widths,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.RESOLUTION,
        mid_block_add_attention=False,
    )


def make_text_encoder(cfg: Config, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    )


def make_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    up = tuple(reversed([b.replace("Down", "Up") for b in cfg.base_down_blocks]))
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=cfg.base_widths,
        down_block_types=cfg.base_down_blocks,
        up_block_types=up,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=tuple(max(1, w // 32) for w in cfg.base_widths),  # heads: 32 channels each
        norm_num_groups=8,
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",  # DDIM's few steps start from pure noise (steps_offset is unused then)
        steps_offset=1,
    )


def _lr(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def _generator(seed: int, step: int) -> torch.Generator:
    """Each step's own randomness, so a resumed run draws what the uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# -- the autoencoder -----------------------------------------------------------------------------


def train_autoencoder(cfg: Config, pixels: torch.Tensor, log):
    """Reconstruction (L1 + MSE, a tiny KL) on random half-size crops (it is convolutional). Sets the scaling
    factor to 1 / the latents' std and returns the autoencoder, eval and frozen."""
    torch.manual_seed(cfg.seed)
    vae = make_autoencoder(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    crop, t0 = world.RESOLUTION // 2, time.time()
    for step in range(cfg.ae_steps):
        g = _generator(cfg.seed + 7, step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.ae_steps, cfg.ae_lr, warmup=50)
        idx = torch.randint(len(pixels), (cfg.ae_batch,), generator=g)
        top, left = (int(v) // 2 * 2 for v in torch.randint(world.RESOLUTION - crop + 1, (2,), generator=g))
        x = pixels[idx, :, top : top + crop, left : left + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == cfg.ae_steps - 1:
            log(f"autoencoder step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=float(1 / latent_means(vae, pixels[:2048]).std()))
    return vae


@torch.no_grad()
def latent_means(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, R, R) in [-1, 1] -> (n, 4, r, r): the posterior's means (unscaled), 512 images at a time."""
    return torch.cat([vae.encode(part).latent_dist.mean for part in pixels.split(512)])


@torch.no_grad()
def round_trip(vae, images: np.ndarray) -> np.ndarray:
    """(n, R, R, 3) uint8 -> the same through the autoencoder (posterior mean), uint8."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = torch.cat([vae.decode(m).sample for m in latent_means(vae, x).split(512)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# -- the UNet and the text encoder ---------------------------------------------------------------


class Training:
    """The UNet and text encoder with their EMA copies and optimiser; saved to and resumed from a folder."""

    def __init__(self, cfg: Config, tokenizer):
        import copy

        torch.manual_seed(cfg.seed + 1)
        self.cfg, self.step = cfg, 0
        self.text, self.unet = make_text_encoder(cfg, tokenizer), make_unet(cfg)
        self.ema_text = copy.deepcopy(self.text).requires_grad_(False)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.params = list(self.unet.parameters()) + list(self.text.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.base_lr, weight_decay=1e-2)

    def _modules(self) -> dict:
        return {"text": self.text, "unet": self.unet, "ema_text": self.ema_text, "ema_unet": self.ema_unet}

    def save(self, folder: str) -> None:
        tensors = {f"{name}.{k}": v for name, m in self._modules().items() for k, v in m.state_dict().items()}
        for i, state in self.opt.state_dict()["state"].items():
            tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "state.safetensors.tmp"))
        os.replace(os.path.join(folder, "state.safetensors.tmp"), os.path.join(folder, "state.safetensors"))
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump({"step": self.step}, f)

    def resume(self, folder: str) -> bool:
        """Load the folder's checkpoint if there is one; True if it did."""
        path = os.path.join(folder, "state.safetensors")
        if not os.path.isfile(path):
            return False
        tensors = load_file(path)
        for name, module in self._modules().items():
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        state = self.opt.state_dict()
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                opt_state.setdefault(int(i), {})[k] = value
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        with open(os.path.join(folder, "state.json")) as f:
            self.step = int(json.load(f)["step"])
        return True


def train_base(cfg: Config, folder: str, latents: torch.Tensor, renders: Renders, tokenizer, log) -> dict:
    """v-prediction (plus the localisation loss) for cfg.base_steps, resuming from ``folder``'s checkpoint;
    returns the EMA UNet and text encoder and the last 100 steps' mean losses."""
    from diffusers import DDPMScheduler

    run = Training(cfg, tokenizer)
    if run.resume(folder):
        log(f"base: resumed at step {run.step}")
    scheduler: DDPMScheduler = make_scheduler()
    maps = CrossAttentionMaps().install(run.unet)  # the live UNet only: the EMA copy keeps diffusers' processors
    maps.recording = cfg.localise > 0
    tail: dict = {"denoise": [], "localise": []}
    t0 = time.time()
    while run.step < cfg.base_steps:
        step, g = run.step, _generator(cfg.seed + 3, run.step)
        for group in run.opt.param_groups:
            group["lr"] = _lr(step, cfg.base_steps, cfg.base_lr)
        idx = torch.randint(len(renders), (cfg.base_batch,), generator=g)
        captions = renders.captions(idx, g, cfg)
        ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        pred = run.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=run.text(ids)[0]).sample
        denoise = F.mse_loss(pred, scheduler.get_velocity(x0, noise, t))
        loss = denoise
        if cfg.localise > 0:
            positions = word_positions(tokenizer, ids, [renders.scenes[i] for i in idx.tolist()])
            localise = localisation_loss(maps.take(), positions, renders.masks[idx])
            loss = loss + cfg.localise * localise
            tail["localise"].append(localise.item())
        tail["denoise"].append(denoise.item())
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        run.opt.step()
        decay = min(cfg.base_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((run.ema_unet, run.unet), (run.ema_text, run.text)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        run.step += 1
        if step % 100 == 0 or run.step == cfg.base_steps:
            extra = f" localise {tail['localise'][-1]:.4f}" if tail["localise"] else ""
            log(f"base step {step} loss {denoise.item():.4f}{extra} ({time.time() - t0:.0f} s)")
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.base_steps:
            run.save(folder)
    maps.recording = False
    losses = {name: round(float(np.mean(v[-100:])), 5) for name, v in tail.items() if v}
    return {"unet": run.ema_unet.eval(), "text": run.ema_text.eval(), "losses": losses}


def save_pipeline(folder: str, vae, text, unet) -> None:
    """A diffusers SD1.5-layout folder beside its tokenizer/ (fp16 weights: half the size; the commands load fp32)."""
    unet.half().save_pretrained(os.path.join(folder, "unet"))
    vae.half().save_pretrained(os.path.join(folder, "vae"))
    text.half().save_pretrained(os.path.join(folder, "text_encoder"))
    make_scheduler().save_pretrained(os.path.join(folder, "scheduler"))
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
    with open(os.path.join(folder, "na_engine.json"), "w") as f:  # read by python -m na_engine train|generate
        json.dump({"latents": "mean", "resolution": world.RESOLUTION}, f, indent=1)
