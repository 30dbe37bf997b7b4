"""Several processes under `accelerate launch` (torchrun, gloo, CPU): training and catalogue generation agree
with one process, resume after a kill, and stop cleanly when a process dies."""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_diffusers import make_base, make_clip_vision, make_photos

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
# One thread per process: both runs compute alike, and two processes share this machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
STEPS, LR = 6, 1e-3


def command(processes: int, *args: str) -> list:
    if processes == 1:
        return [sys.executable, "-m", "na_engine", *args]
    with socket.socket() as s:  # a free port for this launch's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    return [*launch, "-m", "na_engine", *args]


def run(processes: int, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(processes, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from na_engine.standalone.prepare import prepare

    root = tmp_path_factory.mktemp("dist")
    data = str(root / "data")
    prepare(make_photos(str(root / "photos"), count=4), data, "dog", resolution=32)
    return {"base": make_base(str(root / "base")), "vision": make_clip_vision(str(root / "vision")), "data": data}


def train_args(world, out, batch: int, steps: int = STEPS, *more: str) -> list:
    return [
        "train", "--base", world["base"], "--clip-vision", world["vision"], "--data", world["data"],
        "--out", str(out), "--steps", str(steps), "--batch-size", str(batch), "--lr", str(LR), "--tokens", "4",
        "--resampler-depth", "1", "--checkpoint-every", "2", "--caption-dropout", "0.2", "--subject-dropout", "0.2",
        "--warmup", "4",
        *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """The same global batch of 2: one process with batch 2, and two processes with batch 1 each."""
    root = tmp_path_factory.mktemp("runs")
    run(1, *train_args(world, root / "one.safetensors", 2))
    run(2, *train_args(world, root / "two.safetensors", 1))
    return root


def losses(run_dir, column: str = "loss") -> list:
    with open(os.path.join(run_dir, "loss.csv")) as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f)]


def initial_adapter(world) -> dict:
    """The adapter before step 1, as the trainer makes it (seed 0)."""
    from na_engine.families.unet import load_base, unet_config
    from na_engine.standalone.models import adapter_for, clip_vision_width, fresh_config
    from na_engine.standalone.train import init_nested_from_text

    base = load_base(world["base"])
    cfg = fresh_config(unet_config(world["base"])["cross_attention_dim"], clip_vision_width(world["vision"]), 4, 1)
    adapter = adapter_for(base.layers, cfg, 0)
    init_nested_from_text(adapter, base.unet)
    return adapter


def test_two_processes_train_as_one_at_the_same_global_batch(world, runs):
    """Same data order, noise, timesteps and dropout per global row; DDP averages the two half-batch gradients.

    Tolerance: the only difference is the order of fp32 sums (two half-batch means averaged across processes
    against one mean), a relative 1e-7 per step. Adam divides each gradient by its running scale, so such a
    difference stays a small fraction of one step's move (at most about the learning rate per weight);
    1% of one step, LR / 100, bounds it with room, and is 600 times smaller than what 6 steps may move."""
    one_log, two_log = losses(runs / "one_run"), losses(runs / "two_run")
    assert [s for s, _ in one_log] == [s for s, _ in two_log]
    assert [v for _, v in one_log] == pytest.approx([v for _, v in two_log], abs=1e-5)  # the logs print 6 decimals
    assert losses(runs / "one_run", "lr") == losses(runs / "two_run", "lr")  # the warm-up: one step per step
    one, two = load_file(str(runs / "one.safetensors")), load_file(str(runs / "two.safetensors"))
    assert one.keys() == two.keys()
    differ = max((one[k] - two[k]).abs().max().item() for k in one)
    assert differ <= LR / 100, differ
    from na_engine.formats import load_adapter

    start = dict(initial_adapter(world).named_parameters())
    trained = dict(load_adapter(str(runs / "one.safetensors")).named_parameters())
    moved = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert moved > 10 * LR / 100, moved  # training moved the weights far more than the tolerance


def test_only_the_main_process_writes(runs):
    assert [step for step, _ in losses(runs / "two_run")] == list(range(1, STEPS + 1))  # each step logged once
    names = sorted(os.listdir(runs / "two_run"))
    assert names == ["checkpoint-0000002", "checkpoint-0000004", "checkpoint-0000006", "loss.csv"]
    checkpoint = sorted(os.listdir(runs / "two_run" / "checkpoint-0000002"))
    assert "trainer.json" in checkpoint and not any(n.endswith(".partial") for n in checkpoint)
    assert not any(n.endswith(".partial") for n in os.listdir(runs))


def children(pid: int) -> list:
    """Process ids whose parent is pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def start_and_wait_for_checkpoint(world, out, checkpoint: str) -> subprocess.Popen:
    """A long 2-process run, returned once its first checkpoint is complete (renamed into place)."""
    proc = subprocess.Popen(
        command(2, *train_args(world, out, 1, 100_000)),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not os.path.isfile(os.path.join(str(out)[: -len(".safetensors")] + "_run", checkpoint, "trainer.json")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.05)
    return proc


def test_killed_run_resumes_to_the_uninterrupted_weights(world, runs, tmp_path):
    out = tmp_path / "killed.safetensors"
    proc = start_and_wait_for_checkpoint(world, out, "checkpoint-0000002")
    for pid in children(proc.pid) + [proc.pid]:  # the machine goes: workers and launcher at once
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    resume = str(tmp_path / "killed_run" / "checkpoint-0000002")
    (tmp_path / "killed_run" / "checkpoint-0000009.partial").mkdir()  # as a kill during a save leaves them
    (tmp_path / "killed.safetensors.partial").write_bytes(b"half")
    run(2, *train_args(world, out, 1, STEPS, "--resume", resume))
    resumed, uninterrupted = load_file(str(out)), load_file(str(runs / "two.safetensors"))
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0, msg=k)
    assert not any(n.endswith(".partial") for n in os.listdir(tmp_path / "killed_run"))
    assert not (tmp_path / "killed.safetensors.partial").exists()
    assert [step for step, _ in losses(tmp_path / "killed_run")] == list(range(1, STEPS + 1))


def test_resume_under_another_process_count_is_refused(world, runs, tmp_path):
    shutil.copytree(runs / "two_run", tmp_path / "two_run")
    done = subprocess.run(
        command(1, *train_args(world, tmp_path / "two.safetensors", 1, STEPS + 2, "--resume", "latest")),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "made by 2 process(es) with --batch-size 1 --grad-accum 1; this run has 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "two.safetensors").exists()


def test_a_process_that_dies_stops_the_others(world, tmp_path):
    out = tmp_path / "dies.safetensors"
    proc = start_and_wait_for_checkpoint(world, out, "checkpoint-0000002")
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    try:
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "na_engine FAILED" in log and "SIGKILL" in log, log[-3000:]  # torchrun's report
    assert not any(
        os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in workers
    )
    assert not out.exists()
    for name in os.listdir(tmp_path / "dies_run"):  # complete checkpoints only, or a .partial the next run deletes
        assert (
            name == "loss.csv"
            or name.endswith(".partial")
            or os.path.isfile(tmp_path / "dies_run" / name / "trainer.json")
        )


# -- catalogue generation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalogue(world, tmp_path_factory):
    from na_engine.adapter import random_adapter
    from na_engine.families.unet import unet_config
    from na_engine.formats import save_adapter
    from na_engine.layers import diffusers_layers
    from na_engine.resampler import ResamplerConfig

    root = tmp_path_factory.mktemp("catalogue")
    config = ResamplerConfig(dim=32, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=32, output_dim=32)
    adapter = str(root / "adapter.safetensors")
    save_adapter(random_adapter(config, diffusers_layers(unet_config(world["base"])), seed=1), adapter)
    photos = make_photos(str(root / "photos"), count=2)
    rows = [("a photo of a dog", 3), ("a dog in snow", 4), ("a dog on the beach", 5)]
    changed = rows[:2] + [("a red dog on the beach", 5)]
    for name, chosen in (("three.csv", rows), ("changed.csv", changed), ("one.csv", rows[:1])):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "subject", "trigger", "seed"])
            w.writerows([(prompt, photos, "dog", seed) for prompt, seed in chosen])
    return {"root": root, "adapter": adapter}


def generate_args(world, catalogue, batch: str, out) -> list:
    return [
        "generate", "--base", world["base"], "--clip-vision", world["vision"], "--adapter", catalogue["adapter"],
        "--batch", str(catalogue["root"] / batch), "--out", str(out), "--steps", "2", "--size", "32", "--cfg", "2",
    ]  # fmt: skip


def manifest(out) -> list:
    with open(os.path.join(out, "manifest.csv")) as f:
        return list(csv.DictReader(f))


def test_two_processes_render_each_row_once_with_the_same_pixels(world, catalogue, tmp_path):
    run(1, *generate_args(world, catalogue, "three.csv", tmp_path / "one"))
    two = tmp_path / "two"
    run(2, *generate_args(world, catalogue, "three.csv", two))
    rows = manifest(two)
    assert [(r["file"], r["seed"]) for r in rows] == [(r["file"], r["seed"]) for r in manifest(tmp_path / "one")]
    assert [r["rank"] for r in rows] == ["0", "1", "0"]  # row i on process i mod 2
    assert sorted(os.listdir(two)) == sorted(os.listdir(tmp_path / "one"))  # no .partial, nothing twice
    for r in rows:
        a, b = (np.asarray(Image.open(d / r["file"])) for d in (tmp_path / "one", two))
        assert np.array_equal(a, b), r["file"]

    # an interrupted catalogue (row 1's image missing) whose row 2 has since changed: a rerun renders those two
    kept = {r["file"]: os.stat(two / r["file"]).st_mtime_ns for r in rows}
    os.remove(two / rows[1]["file"])
    done = run(2, *generate_args(world, catalogue, "changed.csv", two))
    assert "rendered 2 rows, kept 1 from an earlier run" in done.stdout
    after = manifest(two)
    assert [r["rank"] for r in after] == ["0", "1", "0"] and after[2]["prompt"] == "a red dog on the beach"
    assert after[2]["key"] != rows[2]["key"] and after[0]["key"] == rows[0]["key"]
    assert os.stat(two / rows[0]["file"]).st_mtime_ns == kept[rows[0]["file"]]  # not rendered again
    assert os.stat(two / rows[2]["file"]).st_mtime_ns != kept[rows[2]["file"]]
    again = np.asarray(Image.open(two / rows[1]["file"]))
    assert np.array_equal(again, np.asarray(Image.open(tmp_path / "one" / rows[1]["file"])))


def test_more_processes_than_rows(world, catalogue, tmp_path):
    done = run(2, *generate_args(world, catalogue, "one.csv", tmp_path))
    assert [r["rank"] for r in manifest(tmp_path)] == ["0"]
    assert done.stdout.count("1 images in") == 1 and "rendered 1 rows, kept 0" in done.stdout  # the main process


def test_cpu_launch_that_starts_one_process_is_refused(world, catalogue, tmp_path):
    """accelerate launch --cpu --num_processes 2 runs a single process without mpirun: said, not done silently."""
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "na_engine", *generate_args(world, catalogue, "one.csv", tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--multi_gpu --num_processes N" in done.stderr
    # ours comes first; accelerate's launcher then adds its own traceback of the failed subprocess
    assert done.stderr.lstrip().startswith("error: accelerate launch --cpu --num_processes N starts a single process")
    assert not os.listdir(tmp_path)
