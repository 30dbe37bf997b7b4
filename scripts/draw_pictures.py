#!/usr/bin/env python3
"""Draws the pack's pictures from its own sources, with Pillow alone (no browser, no model):

    example_workflows/<name>.jpg   400x400 thumbnail of each graph, drawn from <name>.json (current
                                   ComfyUI's template browser asks for <name>.jpg beside a custom
                                   node's <name>.json)
    web/docs/<NodeType>.png        each node as the graph editor shows it, from its INPUT_TYPES (the
                                   help pages' picture)
    docs/images/icon.png           registry icon, 400x400
    docs/images/banner.png         registry banner, 21:9 (1260x540)

    python scripts/draw_pictures.py            # draw them all
    python scripts/draw_pictures.py --check    # exit 1 if a committed picture differs from a fresh drawing

Colours are the graph editor's dark theme; this pack's nodes get a teal outline. A thumbnail is
the whole graph scaled to fit, under the title line of its Note. The pack is imported for its node
schemas and names, so ComfyUI must be found (COMFYUI_PATH, or source scripts/setup_env.sh).
"""

import glob
import io
import json
import os
import sys

from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageStat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(REPO, "example_workflows")
NODE_DOCS = os.path.join(REPO, "web", "docs")
IMAGES = os.path.join(REPO, "docs", "images")
THUMB = 400
BANNER = (1260, 540)  # 21:9

# the graph editor's dark theme
CANVAS, GRID = "#222222", "#2b2b2b"
NODE_BG, NODE_TITLE, TEXT, DIM, WIDGET_BG = "#353535", "#222222", "#dddddd", "#999999", "#222222"
OURS = "#3fc1b0"  # this pack's accent
TYPE_COLOURS = {
    "MODEL": "#b39ddb",
    "CLIP": "#ffd500",
    "VAE": "#ff6e6e",
    "CONDITIONING": "#ffa931",
    "LATENT": "#ff9cf9",
    "IMAGE": "#64b5f6",
    "MASK": "#81c784",
    "CLIP_VISION": "#a8dadc",
    "NESTED_ADAPTER": OURS,
    "NESTED_SUBJECTS": OURS,
    "NESTED_CAPTURE": OURS,
}
TITLE_H, SLOT_H, WIDGET_H = 30, 20, 24
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def font(size):
    return ImageFont.load_default(size=max(6, round(size)))  # Pillow's own scalable font: same everywhere


def colour(typ):
    return TYPE_COLOURS.get(typ, "#aaaaaa")


class Card:
    """One node box in graph units: body at (x, y, w, h), its title bar above."""

    def __init__(self, title, x, y, w, h, inputs=(), outputs=(), widgets=(), ours=False, colours=None):
        self.title, self.x, self.y, self.w, self.h = title, x, y, w, h
        self.inputs, self.outputs, self.widgets = list(inputs), list(outputs), list(widgets)
        self.ours = ours
        self.title_bg, self.body_bg = colours or (NODE_TITLE, NODE_BG)

    def slot(self, side, i):
        return (self.x + (self.w if side == "out" else 0), self.y + SLOT_H * (i + 0.7))


def card_of_ui_node(node, ours_types):
    """A node of a UI-format workflow (sockets from its inputs/outputs, widget values unnamed)."""
    (x, y), (w, h) = node["pos"], node["size"]
    colours = (node["color"], node["bgcolor"]) if "color" in node else None
    return Card(
        node.get("title") or node["type"],
        x,
        y,
        w,
        h,
        [(i["name"], i["type"]) for i in node.get("inputs", [])],
        [(o["name"], o["type"]) for o in node.get("outputs", [])],
        [("", v) for v in node.get("widgets_values") or []],
        node["type"] in ours_types,
        colours,
    )


def draw_cards(img, cards, links, scale, offset, text=True):
    """Cards and links (out card, out slot, in card, in slot, type) onto img, graph units * scale + offset."""
    d = ImageDraw.Draw(img)
    ox, oy = offset

    def p(x, y):
        return (ox + x * scale, oy + y * scale)

    for src, s_slot, dst, d_slot, typ in links:
        a, b = p(*src.slot("out", s_slot)), p(*dst.slot("in", d_slot))
        dx = max(40 * scale, (b[0] - a[0]) / 2)
        curve = [_bezier(a, (a[0] + dx, a[1]), (b[0] - dx, b[1]), b, t / 24) for t in range(25)]
        d.line(curve, fill=colour(typ), width=max(1, round(3 * scale)))
    for c in cards:
        x0, y0 = p(c.x, c.y - TITLE_H)
        x1, y1 = p(c.x + c.w, c.y + c.h)
        r = max(1, round(8 * scale))
        outline = OURS if c.ours else "#111111"
        d.rounded_rectangle((x0, y0, x1, y1), r, fill=c.body_bg, outline=outline, width=max(1, round(3 * scale)))
        d.rounded_rectangle(
            (x0, y0, x1, y0 + TITLE_H * scale), r, fill=c.title_bg, outline=outline, width=max(1, round(3 * scale))
        )
        if text:
            d.text(p(c.x + 12, c.y - TITLE_H / 2), c.title, fill=TEXT, font=font(15 * scale), anchor="lm")
        for side, slots in (("in", c.inputs), ("out", c.outputs)):
            for i, (name, typ) in enumerate(slots):
                cx, cy = p(*c.slot(side, i))
                rad = max(1.5, 5 * scale)
                d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=colour(typ))
                if text:
                    at, anchor = (cx + 12 * scale, cy), "lm"
                    if side == "out":
                        at, anchor = (cx - 12 * scale, cy), "rm"
                    d.text(at, name, fill=DIM, font=font(13 * scale), anchor=anchor)
        top = c.y + SLOT_H * max(len(c.inputs), len(c.outputs)) + 6
        for i, (name, value) in enumerate(c.widgets):
            wy = top + i * WIDGET_H
            if wy + WIDGET_H - 4 > c.y + c.h:
                break
            bx0, by0 = p(c.x + 12, wy)
            bx1, by1 = p(c.x + c.w - 12, wy + WIDGET_H - 4)
            d.rounded_rectangle((bx0, by0, bx1, by1), max(1, round(9 * scale)), fill=WIDGET_BG)
            if text:
                f, mid = font(12 * scale), (by0 + by1) / 2
                d.text((bx0 + 10 * scale, mid), name, fill=DIM, font=f, anchor="lm")
                shown = _fit(_shown(value), f, (bx1 - bx0) * (0.55 if name else 0.95), d)
                d.text((bx1 - 10 * scale, mid), shown, fill=TEXT, font=f, anchor="rm")
    return img


def _bezier(a, b, c, e, t):
    u = 1 - t
    return tuple(u**3 * a[k] + 3 * u * u * t * b[k] + 3 * u * t * t * c[k] + t**3 * e[k] for k in (0, 1))


def _shown(value):
    if isinstance(value, float):
        return "%.2f" % value
    return str(value).replace("\n", " ")


def _fit(s, f, width, d):
    while s and d.textlength(s, font=f) > width:
        s = s[:-2] + "…" if len(s) > 2 else ""
    return s


def graph_cards(workflow, ours_types):
    cards = {n["id"]: card_of_ui_node(n, ours_types) for n in workflow["nodes"]}
    links = [(cards[a], a_slot, cards[b], b_slot, typ) for _, a, a_slot, b, b_slot, typ in workflow["links"]]
    return list(cards.values()), links


def bounds(cards):
    return (
        min(c.x for c in cards),
        min(c.y - TITLE_H for c in cards),
        max(c.x + c.w for c in cards),
        max(c.y + c.h for c in cards),
    )


def draw_graph(img, workflow, ours_types, box, text=False):
    """The whole graph scaled to fit box (x0, y0, x1, y1) of img, centred."""
    cards, links = graph_cards(workflow, ours_types)
    gx0, gy0, gx1, gy1 = bounds(cards)
    bx0, by0, bx1, by1 = box
    scale = min((bx1 - bx0) / (gx1 - gx0), (by1 - by0) / (gy1 - gy0))
    offset = (
        bx0 + ((bx1 - bx0) - (gx1 - gx0) * scale) / 2 - gx0 * scale,
        by0 + ((by1 - by0) - (gy1 - gy0) * scale) / 2 - gy0 * scale,
    )
    return draw_cards(img, cards, links, scale, offset, text)


def workflow_title(workflow):
    """The first line of the graph's Note (the builder writes its title there)."""
    for n in workflow["nodes"]:
        if n["type"] == "Note" and n.get("widgets_values"):
            return n["widgets_values"][0].split("\n", 1)[0].strip()
    return ""


def _grid(img, step):
    d = ImageDraw.Draw(img)
    for x in range(0, img.width, step):
        d.line((x, 0, x, img.height), fill=GRID)
    for y in range(0, img.height, step):
        d.line((0, y, img.width, y), fill=GRID)


def thumbnail(workflow, names):
    """Title band, the graph (its Note left out: it lists files, not steps), and a pill per node of
    this pack that the graph uses."""
    img = Image.new("RGB", (THUMB, THUMB), CANVAS)
    _grid(img, 20)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, THUMB, 64), fill="#181818")
    lines = _wrap(workflow_title(workflow), font(20), THUMB - 28, d)[:2]
    for i, line in enumerate(lines):
        d.text((14, 32 + (i - (len(lines) - 1) / 2) * 24), line, fill=TEXT, font=font(20), anchor="lm")
    used = sorted({n["type"] for n in workflow["nodes"] if n["type"] in names}, key=list(names).index)
    pills = _pills(d, [names[t] for t in used], THUMB - 20)
    graph = {**workflow, "nodes": [n for n in workflow["nodes"] if n["type"] != "Note"]}
    draw_graph(img, graph, set(names), (12, 76, THUMB - 12, THUMB - 16 - 26 * len(pills)))
    f = font(13)
    for row, items in enumerate(pills):
        x, y = 10, THUMB - 10 - 26 * (len(pills) - row)
        for text in items:
            w = d.textlength(text, font=f) + 16
            d.rounded_rectangle((x, y, x + w, y + 21), 10, fill="#1b2b29", outline=OURS)
            d.text((x + 8, y + 11), text, fill=TEXT, font=f, anchor="lm")
            x += w + 6
    return img


def _pills(d, texts, width):
    rows, row, used = [], [], 0
    for text in texts:
        w = d.textlength(text, font=font(13)) + 22
        if row and used + w > width:
            rows.append(row)
            row, used = [], 0
        row.append(text)
        used += w
    return rows + ([row] if row else [])


def _wrap(text, f, width, d):
    lines, line = [], ""
    for word in text.split():
        trial = (line + " " + word).strip()
        if line and d.textlength(trial, font=f) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


# ----------------------------------------------------------------- nodes, from their schema
def node_card(cls, display_name):
    """A node as the editor draws it when added: link inputs as sockets, the rest as widgets with
    their defaults (a combo shows its first choice)."""
    sockets, widgets = [], []
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(typ, (list, tuple)):
                widgets.append((name, opts.get("default", typ[0] if typ else "")))
            elif typ in WIDGET_TYPES:
                widgets.append((name, opts.get("default", "")))
            else:
                sockets.append((name, typ))
    outputs = list(zip(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES, cls.RETURN_TYPES))
    h = SLOT_H * max(len(sockets), len(outputs)) + 6 + WIDGET_H * len(widgets) + 8
    return Card(display_name, 20, 20 + TITLE_H, 360, h, sockets, outputs, widgets, ours=True)


def node_picture(card):
    img = Image.new("RGB", (int(card.w + 40), int(card.h + TITLE_H + 40)), CANVAS)
    _grid(img, 20)
    return draw_cards(img, [card], [], 1.0, (0, 0))


def pack_nodes():
    sys.path.insert(0, os.path.join(REPO, "tests", "support"))
    import comfy_harness

    pack = comfy_harness.import_pack()
    return pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS


# ----------------------------------------------------------------- registry icon and banner
def icon():
    """Nested squares (a word's value, replaced per pixel by attention over the subject's tokens)
    over a grid of pixels coloured by the token each one draws from."""
    img = Image.new("RGB", (THUMB, THUMB), "#1b1f24")
    d = ImageDraw.Draw(img)
    tokens = ["#3fc1b0", "#ffa931", "#64b5f6", "#ff9cf9"]
    cells, size, left = 8, 30, 80
    for i in range(cells):
        for j in range(cells):
            k = ((i * 3 + j * 5) // 4 + (i * j) % 3) % len(tokens)
            x, y = left + j * size, left + i * size
            fill = tokens[k] if (i + j) % 3 else "#2c333b"
            d.rounded_rectangle((x + 2, y + 2, x + size - 2, y + size - 2), 5, fill=fill)
    for inset, w in ((40, 10), (64, 6)):
        d.rounded_rectangle((inset, inset, THUMB - inset, THUMB - inset), 36 - inset // 4, outline="#e8e8e8", width=w)
    return img


def banner(workflow, ours_types):
    w, h = BANNER
    img = Image.new("RGB", BANNER, CANVAS)
    _grid(img, 24)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 470, h), fill="#181818")
    img.paste(icon().resize((120, 120), Image.LANCZOS), (40, 60))
    d.text((40, 230), "Nested Attention", fill=TEXT, font=font(44))
    for i, line in enumerate(("Your person, pet or product", "as one word of the prompt,", "for ComfyUI")):
        d.text((40, 300 + i * 36), line, fill=DIM, font=font(28))
    return draw_graph(img, workflow, ours_types, (500, 30, w - 30, h - 30))


# ----------------------------------------------------------------- files
def pictures():
    """{path: Image} of everything this script draws."""
    out = {}
    classes, display = pack_nodes()
    names = {t: display.get(t, t) for t in classes}
    for node_type, cls in classes.items():
        out[os.path.join(NODE_DOCS, node_type + ".png")] = node_picture(node_card(cls, names[node_type]))
    flows = {}
    for path in sorted(glob.glob(os.path.join(WORKFLOWS, "*.json"))):
        with open(path) as f:
            flows[path] = json.load(f)
        out[path[: -len(".json")] + ".jpg"] = thumbnail(flows[path], names)
    out[os.path.join(IMAGES, "icon.png")] = icon()
    out[os.path.join(IMAGES, "banner.png")] = banner(flows[sorted(flows)[0]], set(names))
    return out


def save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        _write(img, f, path)


def _write(img, f, path):
    if path.endswith(".jpg"):
        img.save(f, "JPEG", quality=90, optimize=True)
    else:
        img.save(f, "PNG", optimize=True)


def differs(img, path, tolerance=1.0):
    """Whether the committed file at path is missing, of another size, or differs from img, saved as
    save() would, by more than `tolerance` grey levels on average (what another Pillow's font hinting
    or JPEG encoder may change)."""
    if not os.path.exists(path):
        return True
    buffer = io.BytesIO()
    _write(img, buffer, path)
    with Image.open(path) as old, Image.open(buffer) as new:
        if old.size != new.size:
            return True
        return max(ImageStat.Stat(ImageChops.difference(old.convert("RGB"), new.convert("RGB"))).mean) > tolerance


def main(argv):
    check = "--check" in argv
    bad = []
    for path, img in pictures().items():
        if check:
            if differs(img, path):
                bad.append(os.path.relpath(path, REPO))
        else:
            save(img, path)
            print(os.path.relpath(path, REPO))
    if bad:
        print("out of date (run scripts/draw_pictures.py): " + ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
