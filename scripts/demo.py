"""The demo behind scripts/demo.sh (run that; it sets up the environment first)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
import fixtures_models as fm  # noqa: E402
from comfy_server import ComfyServer, test_sized  # noqa: E402

WF01 = os.path.join(REPO, "example_workflows", "01_single_subject_sdxl.json")
WF05 = os.path.join(REPO, "example_workflows", "05_attention_map_preview.json")
# placeholder mode: the workflows' model names -> the generated files' own names, so a real file of
# the same name in the user's ComfyUI (found first by ComfyUI) can never be mixed with placeholders
PLACEHOLDER = {fm.SDXL_CKPT: fm.SDXL_NAME, fm.VIT_H: fm.CLIP_VISION_NAMES["h"]}


def banner(lines):
    bar = "!" * 78
    print("\n".join(["", bar, bar] + ["!!  " + line for line in lines] + [bar, bar, ""]), flush=True)


def real_files(comfy, needed):
    """{name: path} of the needed model files found in comfy/models/<folder>, and the missing names."""
    found, missing = {}, []
    for folder, name in needed:
        folders = ("nested_attention", "ipadapter") if folder == "nested_attention" else (folder,)
        paths = [os.path.join(comfy, "models", f, name) for f in folders]
        hit = next((p for p in paths if os.path.isfile(p)), None)
        if hit:
            found[name] = hit
        else:
            missing.append("models/%s/%s" % (folder, name))
    return found, missing


def rewrite(path, mapping, out_dir):
    wf = json.load(open(path))
    for node in wf["nodes"]:
        vals = node.get("widgets_values") or []
        if vals and isinstance(vals[0], str) and vals[0] in mapping:
            vals[0] = mapping[vals[0]]
    out = os.path.join(out_dir, os.path.basename(path))
    json.dump(wf, open(out, "w"), indent=1)
    return out


def main():
    comfy = os.path.abspath(os.environ["COMFYUI_PATH"])
    cache = os.environ.get("NA_CACHE") or os.path.expanduser("~/.cache/nested-attention")
    needed = [x for x in fm.workflow_model_files(WF01) if x[0] != "input"]
    found, missing = real_files(comfy, needed)
    work = tempfile.mkdtemp(prefix="na-demo-")
    print("[demo] ComfyUI: %s" % comfy, flush=True)
    if not missing:
        print("[demo] using your model files: " + ", ".join(found.values()))
        models_dir, workflows = os.path.join(work, "models"), [WF01, WF05]
    else:
        banner(
            ["PLACEHOLDER MODELS: RANDOM WEIGHTS. THE IMAGES WILL BE NOISE.", "Not found in %s:" % comfy]
            + ["    " + m for m in missing]
            + [
                "Generating random-weight stand-ins with the real layouts (first time: ~1 min,",
                "~3.5 GB in %s) so the graph runs end to end." % os.path.join(cache, "models"),
                "For real images put the files above there (see the Note in workflow 01).",
            ]
        )
        models_dir = os.environ.get("NA_MODELS_DIR") or os.path.join(cache, "models")
        t0 = time.time()
        fm.comfy_harness.import_comfy()
        for folder, name in needed:
            fm.make_workflow_file(models_dir, folder, name)
        print("[demo] placeholders ready in %.0f s: %s" % (time.time() - t0, models_dir), flush=True)
        workflows = [test_sized(rewrite(p, PLACEHOLDER, work), work) for p in (WF01, WF05)]  # noise: keep it quick
    outputs = os.path.join(os.getcwd(), "outputs")
    os.makedirs(outputs, exist_ok=True)
    copied = []
    with ComfyServer(models_dir, comfy_dir=comfy, extra_args=["--fp32-text-enc"]) as srv:
        print("[demo] ComfyUI server on %s (log: %s)" % (srv.url, srv.log_path), flush=True)
        photo = os.path.join(comfy, "input", "subject_person.png")
        if os.path.isfile(photo):
            shutil.copy(photo, os.path.join(srv.tmp, "input"))
        else:
            print("[demo] no %s: using a drawn placeholder photo" % photo)
            fm.make_input_images(os.path.join(srv.tmp, "input"), ("subject_person.png",))
        for wf, label in zip(workflows, ("01", "05")):
            t0 = time.time()
            res = srv.run_workflow(wf)
            if res["status"] != "completed":
                print(res["raw"][-3000:], "\n--- server log ---\n" + srv.log_tail(40), file=sys.stderr)
                sys.exit("[demo] %s failed" % os.path.basename(wf))
            print("[demo] %s: %s in %.1f s" % (os.path.basename(wf), res["status"], time.time() - t0), flush=True)
            for url in res["urls"]:
                kind = "attention_map" if "nested_attention_maps" in url else "image"
                dst = os.path.join(outputs, "%s_%s.png" % (label[:2], kind))
                shutil.copy(srv.local_path(url), dst)
                copied.append(dst)
    shutil.rmtree(work, ignore_errors=True)
    print("[demo] outputs:")
    for p in copied:
        print("  " + p)
    if missing:
        banner(["REMINDER: these images come from RANDOM PLACEHOLDER WEIGHTS and are noise."])
    study_demo(outputs)


def study_demo(outputs):
    """Real personalisation from the study's committed miniature weights (docs/STUDY.md), through na_engine."""
    if not os.path.isfile(os.path.join(REPO, "study", "weights", "encoders", "adapters", "nested.safetensors")):
        banner(
            [
                "study/weights holds no trained nested adapter yet: the study's personalised images are skipped.",
                "Train it with: python -m study run --out study/weights  (see docs/STUDY.md)",
            ]
        )
        return
    print("[demo] personalised images of held-out products, from study/weights (trained in this repository)")
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "study", "demo", "--out", os.path.join(outputs, "study")], cwd=REPO)
    if done.returncode != 0:
        sys.exit("[demo] the study demo failed")
    print("[demo] study images in %.0f s: %s" % (time.time() - t0, os.path.join(outputs, "study", "grid.png")))


if __name__ == "__main__":
    main()
