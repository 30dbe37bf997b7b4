"""Running a standalone command's main() in-process, as a user would from the shell, and checking that the
files the user had are byte for byte as they were."""

import hashlib
import os


def snapshot(folder) -> dict:
    """Every file under folder -> the hash of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def run(main, argv, capsys) -> tuple:
    """(exit code, stderr) of a command's main; argparse's own refusals exit 2 with their message too."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def command_world(root) -> dict:
    """What the commands need, tiny and random: a base and CLIP vision folder, an adapter for them, two photos."""
    from tiny_diffusers import make_base, make_clip_vision, make_photos

    from na_engine.adapter import random_adapter
    from na_engine.families.unet import unet_config
    from na_engine.formats import save_adapter
    from na_engine.layers import diffusers_layers
    from na_engine.standalone.models import clip_vision_width, fresh_config

    base, vision = make_base(str(root / "base")), make_clip_vision(str(root / "vision"))
    unet = unet_config(base)
    adapter = str(root / "adapter.safetensors")
    resampler = fresh_config(unet["cross_attention_dim"], clip_vision_width(vision), tokens=4, depth=1)
    save_adapter(random_adapter(resampler, diffusers_layers(unet), seed=1), adapter)
    photos = make_photos(str(root / "photos"), count=2)
    return {"base": base, "vision": vision, "photos": photos, "adapter": adapter, "root": root}
