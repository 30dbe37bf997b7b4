"""scripts/gpu_check.py's report as Markdown tables, ready for the README's performance section."""

from __future__ import annotations

from typing import List


def summary(report: dict) -> str:
    parts = report["parts"]
    lines = [
        f"**{report.get('card') or 'unknown device'}**, torch {report['torch']}, CUDA {report['cuda']}, "
        f"{report['date']}: `{report['check']}` ({report['seconds']} s of {report['total_limit_s']} s)",
        "",
    ]
    for name, render in (
        ("device", None),
        ("exactness", _exactness),
        ("layers", _layers),
        ("step_sdxl", _steps),
        ("training", _training),
        ("step_flux", _steps),
    ):
        part = parts.get(name)
        if part is None:
            continue
        if part["items"] and render:
            lines += render(part["items"]) + [""]
        if part["status"] != "ok" or part["notes"]:
            lines += [f"- {name}: {part['status']}" + "".join(f"; {note}" for note in part["notes"]), ""]
    return "\n".join(lines).rstrip()


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _exactness(items: List[dict]) -> List[str]:
    methods = [m for m in items[0]["methods"] if any(i["methods"][m]["applies"] for i in items)]
    lines = [
        "Relative error against float64 (x: against stock SDPA's own error in the same dtype); last column: the "
        "error of the nested change itself, relative to its size",
        "",
        _row(["layer", "dtype", "stock SDPA", *methods, "change, fused"]),
        _row(["---"] * (len(methods) + 4)),
    ]
    for i in items:
        cells = [i["shape"], i["dtype"], f"{i['stock_error']:.1e}"]
        for m in methods:
            r = i["methods"][m]
            cells.append(f"{r['error']:.1e} (x{r['x_stock']:.2f})" if r["applies"] else "n/a")
        fused = i["methods"]["fused"]
        cells.append(f"{fused['change_error']:.1e}" if fused["applies"] else "n/a")
        lines.append(_row(cells))
    return lines


def _kernel(report: dict, width: int = 0) -> str:
    """The backends of the SDPA calls whose query width is not ``width`` (the fused call has more)."""
    return "+".join(dict.fromkeys(c["backend"] for c in report["chosen"] if c["query"][-1] != width)) or "?"


def _layers(items: List[dict]) -> List[str]:
    lines = [
        "One layer against stock SDPA: time (median) and peak extra memory as ratios; the SDPA kernel each call got",
        "",
        _row(["layer", "dtype", "stock ms", "fused", "fused, CFG row", "closed form", "memory, fused", "kernel"]),
        _row(["---"] * 8),
    ]
    for i in items:
        x, mem = i["x_stock"], i["memory_x_stock"]["fused"]
        kernels = f"stock {_kernel(i['kernels']['stock'])}, fused {_kernel(i['kernels']['fused'], i['d'])}"
        cells = [i["shape"], i["dtype"], f"{i['ms']['stock']:.3f}", f"x{x['fused']:.2f}"]
        cells += [f"x{x['fused_cfg']:.2f}" if "fused_cfg" in x else "(B = 1)", f"x{x['closed_form']:.2f}"]
        cells += ["-" if mem is None else f"x{mem:.2f}", kernels]
        lines.append(_row(cells))
    return lines


def _steps(items: List[dict]) -> List[str]:
    lines = [
        "One whole model call (median), diffusers' attention against the nested processors; peak extra memory",
        "",
        _row(["model", "px", "dtype", "batch", "stock ms", "nested processors, no subject", "with a subject", "peak"]),
        _row(["---"] * 8),
    ]
    for i in items:
        peak = i["peak_extra_gib"]
        memory = "-" if peak["stock"] is None else f"{peak['stock']:.1f} -> {peak['nested']:.1f} GiB"
        cells = [f"{i['model']} ({i['parameters_billion']:.2f} B params)", i["pixels"], i["dtype"], i["batch"]]
        cells += [f"{i['ms']['stock']:.1f}", f"x{i['x_stock']['unbound']:.3f}", f"x{i['x_stock']['nested']:.3f}"]
        lines.append(_row(cells + [memory]))
    return lines


def _training(items: List[dict]) -> List[str]:
    lines = [
        "Training throughput after the first step, random-weight base",
        "",
        _row(["python -m na_engine train", "px", "batch", "precision", "steps/s", "samples/s", "peak memory"]),
        _row(["---"] * 7),
    ]
    for i in items:
        cells = [i["base"], i["resolution"], i["batch"], i["mixed_precision"], f"{i['steps_per_s']:.2f}"]
        lines.append(_row(cells + [f"{i['samples_per_s']:.2f}", f"{i['peak_gib']:.1f} GiB ({i['peak_kind']})"]))
    return lines
