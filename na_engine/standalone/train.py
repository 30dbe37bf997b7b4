"""python -m na_engine train: train a Nested Attention encoder on your own subject domain.

Runs under accelerate: plainly on one device, or `accelerate launch -m na_engine train ...`
on many GPUs and machines.  The base UNet, text encoders, VAE and CLIP vision stay
frozen; the resampler and the per-layer nested K/V train on the noise-prediction loss.
Each subject of a row is bound to its own class word in the caption. Its reference is
another photo of the same subject where prepare grouped several (background kept, as a
user gives one), else a white-backed crop of the target itself; either is padded to a
square and never cropped. Caption and subject dropout keep guidance working.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import NestedAdapter
from ..binding import ModelCall, Placement
from ..errors import NestedAttentionError, command_line
from ..families import Family, folder_family
from ..families.unet import SD15
from ..hosts.diffusers_processor import install
from ..subjects import Subject
from . import cli, train_state
from . import validate as validation
from .generate import NestedGenerator
from .models import adapter_for, check_match, clip_vision_width, fresh_config, load_vision, pixel_features
from .prepare import DATASET_FILE, item_subjects
from .references import pad_square, subject_box
from .train_data import RowDraws, TrainSet, collate, step_batches

OOM_ADVICE = (
    "Out of memory. Lower --batch-size (and raise --grad-accum to keep the effective batch), lower --resolution, "
    "turn on --gradient-checkpointing, or use --mixed-precision bf16 (or fp16)."
)


@dataclass
class TrainConfig:
    base: str
    clip_vision: str
    data: str
    out: str
    base_config: Optional[str] = None
    init_from: Optional[str] = None
    steps: int = 1000  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    resolution: Optional[int] = None  # default: the prepared set's
    tokens: int = 16  # subject tokens of a fresh adapter
    resampler_depth: int = 4
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.05
    subject_dropout: float = 0.05
    lr_schedule: str = "cosine"  # after the warm-up: "cosine" decays to a tenth of --lr by the last step; "constant"
    ema: float = 0.999  # EMA decay of the exported weights (warmed up: min(ema, (1 + step) / (10 + step))); 0 = off
    latents: str = "auto"  # "mean" or "sample" of the VAE posterior; auto: the base's na_engine.json, else sample
    timestep_bias: str = "none"  # "later" / "earlier": --timestep-bias-multiplier x as often in that portion
    timestep_bias_multiplier: float = 3.0
    timestep_bias_portion: float = 0.4  # of the schedule's timesteps, at its noisy end ("later") or clean end
    other_photo: float = 1.0  # chance that a subject's reference is another photo of it (where prepare grouped some)
    white_references: bool = False  # whiten another photo's background by its mask, as a masked reference at inference
    subject_loss_weight: float = 1.0  # a latent inside a subject's mask counts this many times another; 1 = plain mean
    checkpoint_every: int = 500
    resume: Optional[str] = None  # a checkpoint folder, or "latest"
    validate_every: int = 0  # 0 = off
    validation_prompts: List[str] = field(default_factory=list)
    validation_steps: int = 30
    seed: int = 0
    workers: int = 0
    fixed_batch: bool = False  # repeat step 0's batch, noise and timesteps (overfitting checks)
    mode: str = "nested"  # or "decoupled": IP-Adapter Plus training, saved in its file layout
    trigger_weight: float = 1.0  # multiplies the attention the trigger word receives, as at inference
    overwrite: bool = False  # replace an existing --out adapter file

    @property
    def run_dir(self) -> str:
        return os.path.splitext(self.out)[0] + "_run"


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate's multiplier after ``step`` optimizer steps: a linear warm-up, then constant or a
    cosine decay to 0.1 at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def latent_convention(cfg: TrainConfig) -> str:
    """mean or sample: --latents, else what the base folder's na_engine.json records, else sample (as SD and
    SDXL were trained, and diffusers' training scripts do)."""
    if cfg.latents != "auto":
        return cfg.latents
    return cli.base_record(cfg.base, cfg.base_config).get("latents", "sample")


def training_latents(posterior, eps: Tensor, sample: bool, vae) -> Tensor:
    """The scaled latents a step trains on: the posterior's mean, or its sample mean + std * eps."""
    return (posterior.mean + posterior.std * eps if sample else posterior.mean) * vae.config.scaling_factor


# -- model --------------------------------------------------------------------------------


class NestedDenoiser(nn.Module):
    """The adapter around the frozen denoiser (a UNet, a DiT): one forward is one prediction, so DDP wraps the whole
    use.  ``family`` says how its denoiser is called (families/)."""

    family: Family = SD15  # a UNet's call where none is given

    def __init__(
        self,
        adapter: NestedAdapter,
        unet,
        trigger: str,
        mode: str = "nested",
        trigger_weight: float = 1.0,
        family: Family = SD15,
    ):
        super().__init__()
        self.adapter, self.trigger, self.mode, self.trigger_weight = adapter, trigger, mode, trigger_weight
        self.family = family
        self.__dict__["unet"] = unet  # frozen, not a submodule: DDP ignores it
        self.__dict__["processors"] = install(unet, adapter.layers)

    def forward(
        self,
        noisy: Tensor,
        timesteps: Tensor,
        context: Tensor,
        added: Optional[dict],
        features: Tensor,
        where: Tensor,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        """noisy (B, 4, h, w); context (B, T, C); features (S, P, E) of S subjects; where (S, T) bool, each
        subject's trigger positions in the caption of its row rows[s] (default: subject s is row s) -> (B, 4, h, w)."""
        return self.predict(noisy, timesteps, context, added, self.adapter.resampler(features), where, rows)

    def predict(
        self,
        noisy: Tensor,
        timesteps: Tensor,
        context: Tensor,
        added: Optional[dict],
        tokens: Tensor,
        where: Tensor,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        """As forward, from the subjects' tokens (S, M, D) instead of their reference features."""
        rows = torch.arange(len(where), device=where.device) if rows is None else rows
        placements = []
        for s in range(len(where)):
            if not bool(where[s].any()):
                continue
            mask = torch.zeros(noisy.shape[0], where.shape[1], dtype=torch.bool, device=where.device)  # (B, T)
            mask[rows[s]] = where[s]
            subject = Subject(tokens[s], self.adapter, self.trigger, mode=self.mode)
            placements.append(Placement(subject, mask, trigger_weight=self.trigger_weight))
        with self.processors.bound(ModelCall(placements, self.family.grid(noisy))):
            pred = self.family.denoise(self.unet, noisy, timesteps, context, added)
        # A batch that dropout left without any subject still backpropagates (to zero), as every DDP rank must.
        return pred if placements else pred + 0 * tokens.sum()


class EMA:
    """Exponential moving average of the adapter's weights, checkpointed with the run."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Average in the weights after optimizer step ``step`` (from 1), warmed up: early weights fade fast."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)

    def copy_to(self, module: nn.Module) -> nn.Module:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return module

    def state_dict(self) -> Dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: Dict[str, Tensor]) -> None:
        self.shadow = {k: v.to(self.shadow[k].device, torch.float32).clone() for k, v in sd.items()}


def init_nested_from_text(adapter: NestedAdapter, denoiser) -> None:
    """Start each nested K/V at the projection its layer's text goes through, as IP-Adapter does (tokens live in
    context space): a UNet's to_k/to_v, a Flux double block's text stream (add_k_proj/add_v_proj), a single
    block's to_k/to_v over the whole sequence."""
    modules = dict(denoiser.named_modules())
    with torch.no_grad():
        for layer in adapter.layers:
            attn = modules[layer.diffusers]
            to_k = getattr(attn, "add_k_proj", None) or attn.to_k
            to_v = getattr(attn, "add_v_proj", None) or attn.to_v
            if to_k.weight.shape == adapter.to_k[layer.index].weight.shape:
                adapter.to_k[layer.index].weight.copy_(to_k.weight)
                adapter.to_v[layer.index].weight.copy_(to_v.weight)


# -- the run ------------------------------------------------------------------------------


def check_data(cfg: TrainConfig, record: dict) -> None:
    """Every listed image opens, and the class words are in the captions: a set the trainer cannot learn from
    is refused before any model loads."""
    from PIL import Image

    from ..tokens import has_word

    broken, unbound, unmasked = [], [], []
    for name, subjects in zip(record["items"], item_subjects(record)):
        if cfg.subject_loss_weight != 1 and not all(
            s.get("mask") and os.path.isfile(os.path.join(cfg.data, s["mask"])) for s in subjects
        ):
            unmasked.append(name)
        try:
            with Image.open(os.path.join(cfg.data, name + ".png")) as im:
                im.load()
        except Exception as e:
            broken.append(f"{name}.png ({type(e).__name__}: {e})")
            continue
        caption_file = os.path.join(cfg.data, name + ".txt")
        caption = ""
        if os.path.isfile(caption_file):
            with open(caption_file) as f:
                caption = f.read()
        if not all(has_word(caption, s["trigger"]) for s in subjects):
            unbound.append(name)
    if broken:
        raise NestedAttentionError(
            f"{len(broken)} training images in {cfg.data} cannot be read: {'; '.join(broken[:5])}"
            f"{' ...' if len(broken) > 5 else ''}. Run prepare again, or remove them from {DATASET_FILE}."
        )
    if unmasked:
        raise NestedAttentionError(
            f"--subject-loss-weight {cfg.subject_loss_weight} weighs the loss inside each subject's mask, but "
            f"{len(unmasked)} of {len(record['items'])} items in {cfg.data} have no mask file (e.g. {unmasked[0]}). "
            "Run prepare again with --masks, or train with --subject-loss-weight 1."
        )
    if len(unbound) == len(record["items"]):
        words = sorted({s["trigger"] for subjects in item_subjects(record) for s in subjects})
        raise NestedAttentionError(
            f"No caption in {cfg.data} holds its class word ({', '.join(words)}), so no subject would ever be bound "
            "and training could not learn. Put the word in the captions (<name>.txt), or prepare with the right "
            "--class-word."
        )
    if unbound:
        print(
            f"warning: {len(unbound)} of {len(record['items'])} captions lack their class word (e.g. "
            f"{unbound[0]}.txt); those rows train without their subject."
        )


def check_inputs(cfg: TrainConfig):
    """Everything that can be checked from files and configs, before any weights load.

    Returns (record, the base's family, its layers, its context width, vision width, init adapter)."""
    from ..formats import load_adapter

    validation.train_options(cfg)
    record_path = os.path.join(cfg.data, DATASET_FILE)
    if not os.path.isdir(cfg.data):
        raise NestedAttentionError(f"Data folder not found: {cfg.data}")
    if not os.path.isfile(record_path):
        raise NestedAttentionError(
            f"{cfg.data} is not a prepared training set (no {DATASET_FILE}); run `python -m na_engine prepare` on "
            "your photos first."
        )
    try:
        with open(record_path) as f:
            record = json.load(f)
        record["items"], record["class_word"], record.get("resolution")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NestedAttentionError(
            f"{record_path} is damaged ({type(e).__name__}: {e}); run `python -m na_engine prepare` again."
        ) from None
    present = [i for i in record.get("items", []) if os.path.isfile(os.path.join(cfg.data, i + ".png"))]
    if not present:
        raise NestedAttentionError(
            f"The data folder {cfg.data} is empty: none of its {len(record.get('items', []))} listed images are there."
        )
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise NestedAttentionError("--mixed-precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")
    if not cfg.out.endswith(".safetensors"):
        raise NestedAttentionError(f"--out must name a .safetensors adapter file, not {cfg.out!r}.")
    if os.path.isdir(cfg.out):
        raise NestedAttentionError(f"--out {cfg.out} is a folder; name the adapter file to write, e.g. my.safetensors.")
    if os.path.exists(cfg.out) and not (cfg.overwrite or cfg.resume):
        raise NestedAttentionError(
            f"--out {cfg.out} already exists. Name a new file, or add --overwrite to replace it."
        )
    cli.check_writable(f"--out {cfg.out}", os.path.dirname(os.path.abspath(cfg.out)))
    earlier = checkpoints(cfg.run_dir)
    if earlier and not cfg.resume:
        raise NestedAttentionError(
            f"{cfg.run_dir} holds checkpoints of an earlier run (up to {earlier[-1]}). Continue it with --resume "
            "latest, or start afresh with another --out (or after removing that folder)."
        )
    if cfg.resume:
        check_resume(cfg)
    validation.train_data(cfg, record)
    check_data(cfg, record)
    validation.base_folder(cfg.base, cfg.base_config)
    validation.clip_vision(cfg.clip_vision)
    family = folder_family(cfg.base, cfg.base_config)
    layers, width = family.folder_layers(cfg.base, cfg.base_config), clip_vision_width(cfg.clip_vision)
    family.refuse_mode(cfg.mode)
    side = family.side_multiple
    if int(record["resolution"] if cfg.resolution is None else cfg.resolution) % side:
        raise NestedAttentionError(
            f"{family.title} trains on sides that are multiples of {side}; pass --resolution accordingly."
        )
    context = family.context_width(cfg.base, cfg.base_config, layers)
    init = load_adapter(cfg.init_from) if cfg.init_from else None
    check_match(layers, width, init, cfg.base, cfg.clip_vision)
    return record, family, layers, context, width, init


@dataclass
class Session:
    """What setup() builds for one run and every step uses."""

    cfg: TrainConfig
    accelerator: object
    base: object  # the frozen base: unet, vae, text encoders, scheduler
    vision: object  # the frozen CLIP vision model and its processor
    adapter: NestedAdapter  # what trains
    model: nn.Module  # the NestedDenoiser, as accelerate prepared it
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[EMA]
    data: TrainSet
    loader: torch.utils.data.DataLoader
    resolution: int
    frozen_dtype: torch.dtype
    sample_latents: bool  # train on the VAE posterior's sample, else on its mean (latent_convention)
    start: int  # the optimizer step it starts (or resumes) after
    family: Family  # the base's: its denoiser call and its step inputs

    @property
    def device(self):
        return self.accelerator.device


def train(cfg: TrainConfig) -> str:
    """Run (or resume) training; returns the path of the exported adapter."""
    from tqdm.auto import tqdm

    run = setup(cfg)
    log = _Log(os.path.join(cfg.run_dir, "loss.csv"), run.accelerator.is_main_process, run.start)
    bar = tqdm(total=cfg.steps, initial=run.start, desc="training", disable=not run.accelerator.is_local_main_process)
    step, losses, t0 = run.start, [], time.time()
    try:
        for micro, batch in enumerate(run.loader, start=run.start * cfg.grad_accum):
            losses.append(micro_step(run, micro, batch))
            if (micro + 1) % cfg.grad_accum:
                continue
            mean = run.accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
            losses = []
            if not math.isfinite(mean):
                _stop_non_finite(cfg, "loss", mean, step + 1)
            step = optimizer_step(run, step)
            log.write(step, mean, run.schedule.get_last_lr()[0], time.time() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(run, step)
            if cfg.validate_every and step % cfg.validate_every == 0 and run.accelerator.is_main_process:
                validate(cfg, run.base, run.vision, run.adapter, run.ema, run.data, step, run.device)
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            raise NestedAttentionError(
                f"{OOM_ADVICE} ({e.__class__.__name__} at step {step}, batch {cfg.batch_size}, "
                f"resolution {run.resolution})"
            ) from e
        raise
    finally:
        bar.close()
    return export(run)


def setup(cfg: TrainConfig) -> Session:
    """Checks the inputs, loads the frozen models, builds (or resumes) the adapter, its optimizer and the data."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    record, family, layers, context, width, init = check_inputs(cfg)
    cli.check_launch()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,  # every process runs every step: one schedule step per optimizer step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    frozen_dtype = cli.DTYPES[{"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)]
    vision = load_vision(cfg.clip_vision, frozen_dtype)
    base = family.load(cfg.base, cfg.base_config, frozen_dtype)
    for module in [base.unet, base.vae, vision.model] + base.text_encoders:
        module.to(accelerator.device)
    if init is not None:
        adapter = init.train()
    else:
        adapter = adapter_for(layers, fresh_config(context, width, cfg.tokens, cfg.resampler_depth), cfg.seed)
        init_nested_from_text(adapter, base.unet)
    model = NestedDenoiser(adapter, base.unet, record["class_word"], cfg.mode, cfg.trigger_weight, family)
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing(model.processors.checkpoint)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    ema = EMA(adapter, cfg.ema) if cfg.ema > 0 else None
    parts = _stateful(adapter, optimizer, schedule, ema, accelerator)
    start = _resume(accelerator, cfg, parts) if cfg.resume else 0
    resolution = cfg.resolution or int(record["resolution"])
    masks = cfg.subject_loss_weight != 1
    data = TrainSet(cfg.data, resolution, vision.processor, cfg.seed, cfg.other_photo, cfg.white_references, masks)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_steps = (start * cfg.grad_accum, cfg.steps * cfg.grad_accum)
    batches = step_batches(len(data), cfg.batch_size, *micro_steps, cfg.seed, rank, world, cfg.fixed_batch)
    loader = torch.utils.data.DataLoader(data, batch_sampler=list(batches), collate_fn=collate, num_workers=cfg.workers)
    if accelerator.is_main_process:
        _remove_partials(cfg)
    return Session(
        cfg, accelerator, base, vision, adapter, model, optimizer, schedule, ema, data, loader, resolution,
        frozen_dtype, latent_convention(cfg) == "sample", start, family,
    )  # fmt: skip


def micro_step(run: Session, micro: int, batch: dict) -> Tensor:
    """One micro-batch: noise its targets, predict, backpropagate; returns the (detached) loss."""
    cfg, device = run.cfg, run.device
    rank = run.accelerator.process_index
    rows = range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)  # this process's global rows
    with torch.no_grad():
        posterior = run.base.vae.encode(batch["target"].to(device)).latent_dist
        timesteps = run.base.scheduler.config.num_train_timesteps
        r = RowDraws.draw(cfg, micro, rows, posterior.mean.shape[1:], timesteps)
        captions = ["" if d else c for d, c in zip(r.drop_caption.tolist(), batch["caption"])]
        features = pixel_features(run.vision, batch["references"], device).float()  # (S, P, E)
        subject_rows = batch["subject_rows"]  # (S,)
        latents = training_latents(posterior, r.latent_eps.to(device), run.sample_latents, run.base.vae)
        noise, timesteps = r.noise.to(device), r.timesteps.to(device)
        step = run.family.step_inputs(run.base, latents, noise, timesteps, captions, run.resolution, run.frozen_dtype)
        where = step.where(run.base, [captions[i] for i in subject_rows], batch["triggers"])  # (S, T)
    where &= ~r.drop_subject[subject_rows][:, None]
    sync = (micro + 1) % cfg.grad_accum == 0
    with contextlib.nullcontext() if sync else run.accelerator.no_sync(run.model):
        with run.accelerator.autocast():
            pred = run.model(
                step.noisy,
                step.timesteps,
                step.context,
                step.added,
                features,
                where.to(device),
                subject_rows.to(device),
            )
        if cfg.subject_loss_weight == 1:
            loss = F.mse_loss(pred.float(), step.target.float())
        else:
            weights = subject_weights(batch["mask"].to(device), posterior.mean.shape, cfg.subject_loss_weight)
            loss = weighted_mse(pred.float(), step.target.float(), step.layout(weights))
        run.accelerator.backward(loss / cfg.grad_accum)
    return loss.detach().float()


def subject_weights(mask: Tensor, latent: torch.Size, weight: float) -> Tensor:
    """mask (B, 1, R, R) in [0, 1], the row's subjects -> (B, C, h, w) loss weights at the latent grid: 1 outside
    every subject, ``weight`` inside, and between them by the share of a latent's pixels a subject covers."""
    share = F.interpolate(mask.float(), size=tuple(latent[-2:]), mode="area")  # (B, 1, h, w)
    return (1 + (weight - 1) * share).expand(-1, latent[1], -1, -1)


def weighted_mse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """The squared error's mean under ``weights`` (as pred's shape): the plain mean where they are all equal."""
    return ((pred - target).pow(2) * weights).sum() / weights.sum()


def optimizer_step(run: Session, step: int) -> int:
    """Clip, step the optimizer, the LR schedule and the EMA; returns the new step count."""
    norm = float(run.accelerator.clip_grad_norm_(run.adapter.parameters(), 1.0))
    if not math.isfinite(norm) and run.accelerator.scaler is None:  # fp16's scaler skips such a step itself
        _stop_non_finite(run.cfg, "gradient norm", norm, step + 1)
    run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.adapter, step + 1)
    return step + 1


def _stop_non_finite(cfg: TrainConfig, what: str, value: float, step: int) -> None:
    """Stop a run whose loss or gradient is no longer a number, before it changes the weights: the adapter is not
    written, and the checkpoints so far are kept."""
    found = checkpoints(cfg.run_dir)
    kept = f"the last good checkpoint is {os.path.join(cfg.run_dir, found[-1])}" if found else "no checkpoint yet"
    causes = [f"--lr {cfg.lr:g} too high (try {cfg.lr / 10:g})"]
    usual = {"subject_loss_weight": 1, "trigger_weight": 1, "timestep_bias_multiplier": 3}  # their defaults
    causes += [f"{validation.flag(n)} {getattr(cfg, n):g} too large" for n, v in usual.items() if getattr(cfg, n) > v]
    if cfg.mixed_precision == "fp16":
        causes.append("fp16 overflow (use --mixed-precision bf16)")
    raise NestedAttentionError(
        f"The {what} became {value} at step {step}; training stopped before that step changed the weights, and no "
        f"adapter was written ({kept}). Likely cause: {', or '.join(causes)}. Fix it and start again under another "
        f"--out (or after removing {cfg.run_dir})."
    )


def export(run: Session) -> str:
    """The trained weights (their EMA, if on) in our format, or IP-Adapter's for --mode decoupled."""
    from ..formats import save_adapter, save_ip_adapter

    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        final = run.ema.copy_to(copy.deepcopy(run.adapter)) if run.ema is not None else run.adapter
        (save_ip_adapter if run.cfg.mode == "decoupled" else save_adapter)(final, run.cfg.out)
    return run.cfg.out


def _remove_partials(cfg: TrainConfig) -> None:
    """What a killed run left half-written."""
    for name in os.listdir(cfg.run_dir) if os.path.isdir(cfg.run_dir) else []:
        if name.endswith(".partial"):
            shutil.rmtree(os.path.join(cfg.run_dir, name), ignore_errors=True)
    if os.path.isfile(cfg.out + ".partial"):
        os.remove(cfg.out + ".partial")


class _Log:
    """CSV of step, loss, learning rate, seconds since this (re)start; a resume keeps the rows up to its
    checkpoint (a killed run may have logged past it) and appends."""

    def __init__(self, path: str, active: bool, start: int):
        self.path, self.active = path, active
        if not active:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kept = []
        if start > 0 and os.path.isfile(path):
            with open(path, newline="") as f:
                kept = [row for row in list(csv.reader(f))[1:] if int(row[0]) <= start]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["step", "loss", "lr", "seconds"], *kept])

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        if self.active:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{seconds:.1f}"])


def _stateful(adapter, optimizer, schedule, ema: Optional[EMA], accelerator) -> dict:
    """What a checkpoint saves and a resume restores, by name: each has state_dict and load_state_dict."""
    parts = dict(adapter=adapter, optimizer=optimizer, schedule=schedule, ema=ema, scaler=accelerator.scaler)
    return {name: part for name, part in parts.items() if part is not None}


def _checkpoint(run: Session, step: int) -> None:
    """checkpoint-<step>/, made complete under a .partial name and renamed: a killed run leaves no half checkpoint.
    Its state is one safetensors file (train_state.py) and trainer.json: nothing in it is a pickle."""
    accelerator, cfg = run.accelerator, run.cfg
    folder = os.path.join(cfg.run_dir, f"checkpoint-{step:07d}")
    if accelerator.is_main_process:
        os.makedirs(folder + ".partial", exist_ok=True)
        parts = _stateful(run.adapter, run.optimizer, run.schedule, run.ema, accelerator)
        train_state.save(
            os.path.join(folder + ".partial", train_state.STATE_FILE),
            {name: part.state_dict() for name, part in parts.items()},
        )
        meta = {
            "step": step,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "processes": accelerator.num_processes,
            "mode": cfg.mode,
            **{name: getattr(cfg, name) for name in RESUME_SAME},
        }
        with open(os.path.join(folder + ".partial", "trainer.json"), "w") as f:
            json.dump(meta, f)
        if os.path.isdir(folder):  # a resumed run passing a step again: the old one goes only once the new is in
            os.replace(folder, folder + ".old.partial")
        os.replace(folder + ".partial", folder)
        shutil.rmtree(folder + ".old.partial", ignore_errors=True)
    accelerator.wait_for_everyone()


RESUME_SAME = (  # what changes what is trained: recorded in trainer.json, and a resume must match them
    "lr",
    "warmup",
    "lr_schedule",
    "ema",
    "resolution",
    "tokens",
    "resampler_depth",
    "caption_dropout",
    "subject_dropout",
    "latents",
    "timestep_bias",
    "timestep_bias_multiplier",
    "timestep_bias_portion",
    "other_photo",
    "white_references",
    "subject_loss_weight",
    "trigger_weight",
    "seed",
    "fixed_batch",
)


def checkpoints(run_dir: str) -> List[str]:
    """The complete checkpoint folders of a run, oldest first."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(d for d in names if re.fullmatch(r"checkpoint-\d+", d))


def check_resume(cfg: TrainConfig) -> tuple:
    """(checkpoint folder, its trainer.json) for --resume, checked before any model loads: a folder holding a
    pickle is refused, and every option recorded there must be this run's."""
    folder = cfg.resume
    if folder == "latest":
        found = checkpoints(cfg.run_dir)
        if not found:
            raise NestedAttentionError(f"--resume latest: no checkpoint in {cfg.run_dir}.")
        folder = os.path.join(cfg.run_dir, found[-1])
    if not os.path.isdir(folder):
        raise NestedAttentionError(f"--resume {folder}: no such checkpoint folder.")
    train_state.refuse_pickles(folder)
    if not os.path.isfile(os.path.join(folder, "trainer.json")):
        raise NestedAttentionError(f"{folder} is not a training checkpoint (no trainer.json).")
    try:
        with open(os.path.join(folder, "trainer.json")) as f:
            meta = json.load(f)
        int(meta["step"]), meta["batch_size"], meta["grad_accum"]
    except (ValueError, KeyError, TypeError) as e:
        raise NestedAttentionError(
            f"{folder}/trainer.json is damaged ({type(e).__name__}: {e}); resume from another checkpoint."
        ) from None
    if meta.get("mode", "nested") != cfg.mode:
        raise NestedAttentionError(f"{folder} was trained with --mode {meta.get('mode', 'nested')}; resume with it.")
    differ = [n for n in RESUME_SAME if meta.get(n) != getattr(cfg, n)]
    if differ:
        raise NestedAttentionError(
            f"{folder} was trained with "
            + ", ".join(f"--{n.replace('_', '-')} {meta.get(n, '(not recorded)')}" for n in differ)
            + "; resume with the same (this run has "
            + ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in differ)
            + ")."
        )
    return folder, meta


def _resume(accelerator, cfg: TrainConfig, parts: dict) -> int:
    folder, meta = check_resume(cfg)
    made = (meta["batch_size"], meta["grad_accum"], meta.get("processes", 1))
    if made != (cfg.batch_size, cfg.grad_accum, accelerator.num_processes):
        raise NestedAttentionError(
            f"{folder} was made by {made[2]} process(es) with --batch-size {made[0]} --grad-accum {made[1]}; "
            f"this run has {accelerator.num_processes} with --batch-size {cfg.batch_size} --grad-accum "
            f"{cfg.grad_accum}. Resume with the same three: the batch is per process, and the data order follows "
            "the global batch."
        )
    state = train_state.load(os.path.join(folder, train_state.STATE_FILE))
    missing = [name for name in parts if name not in state]
    if missing:
        raise NestedAttentionError(f"{folder} holds no {', '.join(missing)} state; resume from another checkpoint.")
    for name, part in parts.items():
        try:
            part.load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise NestedAttentionError(
                f"{folder}: its {name} state does not fit this run ({type(e).__name__}: {str(e)[:300]}); resume "
                "from a checkpoint of this run."
            ) from None
    return int(meta["step"])


@torch.no_grad()
def validate(
    cfg: TrainConfig, base, vision, adapter: NestedAdapter, ema: Optional[EMA], data: TrainSet, step: int, device
) -> None:
    """Images and attention-map panels for the validation prompts, with the first training subject."""
    weights = ema.copy_to(copy.deepcopy(adapter)) if ema is not None else adapter
    generator = NestedGenerator(base, vision, weights, device)
    first = data.subjects[0][0]
    reference = subject_box(data.image(0), data.mask(0, first), white=True)
    subject = generator.encode([pad_square(reference)], first["trigger"]).with_(mode=cfg.mode)
    prompts = cfg.validation_prompts or [f"a photo of a {first['trigger']}"]
    folder = os.path.join(cfg.run_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, prompt in enumerate(prompts):
        picture, panel = generator(
            prompt,
            subject,
            cfg.seed,
            cfg.validation_steps,
            base.family.guidance,
            data.resolution,
            trigger_weight=cfg.trigger_weight,
        )
        picture.save(os.path.join(folder, f"step{step:07d}_{i}.png"))
        panel.save(os.path.join(folder, f"step{step:07d}_{i}.maps.png"))


HELP = {  # the options of python -m na_engine train; their defaults are TrainConfig's
    "data": "folder written by python -m na_engine prepare",
    "out": "adapter file to write (.safetensors)",
    "init_from": "start from this IP-Adapter Plus or Nested Attention checkpoint",
    "steps": "optimizer steps",
    "batch_size": "per device",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "AdamW learning rate",
    "warmup": "steps of linear learning-rate warm-up",
    "resolution": "training image side; default: the prepared set's",
    "tokens": "subject tokens of a fresh adapter",
    "resampler_depth": "resampler layers of a fresh adapter",
    "mixed_precision": "precision of the frozen models and the autocast",
    "gradient_checkpointing": "recompute UNet activations in the backward pass (less memory)",
    "caption_dropout": "fraction of captions emptied, so guidance keeps working",
    "subject_dropout": "fraction of rows trained without their subject",
    "lr_schedule": "after the warm-up: cosine (decays to a tenth of --lr by the last step) or constant",
    "ema": "EMA decay of the exported weights, warmed up over the first steps; 0 = off",
    "latents": "train on the VAE posterior's mean or a sample of it; auto: what the base folder's na_engine.json "
    "records, else sample (SD1.5 and SDXL)",
    "timestep_bias": "later / earlier: sample the noisiest / cleanest timesteps more often (identity is decided at "
    "the noisy end)",
    "timestep_bias_multiplier": "how many times as often, with --timestep-bias",
    "timestep_bias_portion": "the fraction of the schedule that --timestep-bias favours",
    "other_photo": "chance that a subject's reference is another photo of it (photos grouped by prepare); else a "
    "white-backed crop of the training image itself",
    "white_references": "whiten the background of another photo's reference by its mask (prepare --masks), for an "
    "adapter users will give masked references; default: kept, as a user's uncut photo",
    "subject_loss_weight": "a latent inside a subject's mask (prepare --masks) counts this many times one outside in "
    "the loss, so that the subject is not one small part of a whole-image mean; 1 = the plain mean",
    "checkpoint_every": "steps between checkpoints (resumable with --resume)",
    "resume": "checkpoint folder, or 'latest'",
    "validate_every": "steps between validation images; 0 = off",
    "validation_prompts": "a validation prompt holding the class word (repeatable)",
    "validation_steps": "sampling steps of the validation images",
    "seed": "seed of data order, augmentation, noise and a fresh adapter",
    "workers": "data loader processes",
    "mode": "nested, or decoupled: IP-Adapter Plus (added image attention), saved in the IP-Adapter Plus layout",
    "overwrite": "replace an existing --out file",
    "trigger_weight": "multiplies the attention the trigger word receives while training (1 = the paper's formula); "
    "sample the adapter with the same --trigger-weight / trigger_weight",
}


def parse(argv=None) -> TrainConfig:
    p = cli.parser("train", __doc__)
    cli.add_model_arguments(p)
    cli.add_config_arguments(
        p,
        TrainConfig,
        HELP,
        **{name: {"choices": choices} for name, choices in validation.TRAIN_CHOICES.items()},
        seed={"type": cli.seed},
        **{name: {"flag": flag} for name, flag in validation.FLAGS.items()},
    )
    options = vars(p.parse_args(argv))
    options.pop("debug")  # command_line's, not the run's
    return TrainConfig(**options)


@command_line(interrupted="continue from the last checkpoint with the same command and --resume latest.")
def main(argv=None) -> int:
    print(f"adapter written to {train(parse(argv))}")
    return 0
