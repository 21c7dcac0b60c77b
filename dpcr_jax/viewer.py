"""A self-contained interactive point-cloud viewer: one HTML file, no server, no network.

``write_viewer`` embeds the clouds (float32, base64) and the input images (PNG data URIs) of a set of
examples in one HTML file with a small canvas-2D point renderer in inline JavaScript (no library, no CDN):
drag to rotate (left/right turns about the frame's up axis, up/down tilts), wheel or +/- to zoom, check
boxes toggle each cloud (sparse / dense / ground truth), a list picks the example (or the n/p keys), and
buttons set the view: 'input' (the direction of the input image's camera, framed to fit: not pixel-aligned,
for that see the pictures' 'on input' column) and the frame's fixed 'front' / 'side' / 'top' views.
``read_viewer_data`` parses a written file back (the tests use it).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from dpcr_jax import viewpoints

COLORS = {"sparse": "#1f77b4", "dense": "#d62728", "ground truth": "#2ca02c"}
_DATA_ID = "dpcr-data"


def _png_data_uri(image: np.ndarray, max_side: int = 256) -> str:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  pil = Image.fromarray(image)
  if max(pil.size) > max_side:
    pil = pil.resize((max_side, max_side * pil.size[1] // pil.size[0]), Image.BILINEAR)
  buffer = io.BytesIO()
  pil.save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _encode_cloud(points: np.ndarray) -> dict:
  points = np.asarray(points, np.float32)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"clouds must be [N, 3], got {points.shape}")
  if not np.all(np.isfinite(points)):
    raise ValueError("clouds must be finite (NaN or inf found)")
  return {"n": int(len(points)), "f32": base64.b64encode(points.astype("<f4").tobytes()).decode("ascii")}


def write_viewer(path: str, examples: Sequence[dict], frame: viewpoints.CloudFrame | None = None,
                 title: str = "", max_examples: int = 64) -> str:
  """Writes the viewer HTML for ``examples`` and returns ``path``.

  Args:
    examples: dicts with 'name' (str), 'clouds' ({label: [N,3]}, e.g. sparse / dense / ground truth, in the
      run's cloud frame), optionally 'image' (the input, float [H,W,3] in [0,1] or uint8) and 'camera'
      (its viewpoints.Camera, or None when unknown).
    frame: the cloud frame (its up direction and fixed views); None = view-frame clouds (y up, front = as given).
    max_examples: only the first ones are embedded (the file holds every point: ~270 kB per 16384-point cloud).
  """
  if not examples:
    raise ValueError("write_viewer needs at least one example")
  shown = list(examples)[:max_examples]
  views = {}
  if frame is not None:
    views = {v: frame.view_rotation(v).reshape(-1).tolist() for v in viewpoints.FIXED_VIEWS}
    up = np.asarray(frame.up, np.float64).tolist()
  else:
    views = {"front": np.eye(3).reshape(-1).tolist(), "side": [0, 0, -1, 0, 1, 0, 1, 0, 0],
             "top": [1, 0, 0, 0, 0, -1, 0, 1, 0]}
    up = [0.0, 1.0, 0.0]
  data = {"title": title, "frame": frame.name if frame is not None else "view frame", "up": up, "views": views,
          "colors": COLORS, "total_examples": len(examples), "examples": []}
  for i, ex in enumerate(shown):
    if not ex.get("clouds"):
      raise ValueError(f"example {i} has no clouds")
    cam = ex.get("camera")
    data["examples"].append({
        "name": str(ex.get("name", f"example {i}")),
        "image": _png_data_uri(ex["image"]) if ex.get("image") is not None else None,
        "input_rotation": None if cam is None else np.asarray(cam.rotation, np.float64).reshape(-1).tolist(),
        "clouds": {str(k): _encode_cloud(v) for k, v in ex["clouds"].items()}})
  payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
  page = _TEMPLATE.replace("__TITLE__", html.escape(title or "dpcr-jax point clouds")).replace(
      "__DATA__", payload)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


def read_viewer_data(path: str) -> dict:
  """Parses a viewer file: its JSON with every cloud decoded to float32 [N,3] under clouds[label]."""
  with open(path, encoding="utf-8") as f:
    page = f.read()
  start_tag = f'<script type="application/json" id="{_DATA_ID}">'
  start = page.index(start_tag) + len(start_tag)
  data = json.loads(page[start:page.index("</script>", start)])
  for ex in data["examples"]:
    ex["clouds"] = {k: np.frombuffer(base64.b64decode(v["f32"]), "<f4").reshape(v["n"], 3)
                    for k, v in ex["clouds"].items()}
  return data


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px sans-serif; margin: 8px; color: #222; }
#bar { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 6px; }
#main { display: flex; gap: 10px; align-items: flex-start; }
#view { border: 1px solid #aaa; background: #fff; cursor: grab; touch-action: none; }
#input { border: 1px solid #aaa; max-width: 256px; image-rendering: pixelated; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 3px; }
#help { color: #666; font-size: 12px; }
</style></head>
<body>
<div id="bar">
  <b id="title"></b>
  <label>example <select id="pick"></select></label>
  <span id="toggles"></span>
  <span>view: <button data-view="input">input</button><button data-view="front">front</button><button
    data-view="side">side</button><button data-view="top">top</button></span>
  <label>point size <input id="size" type="range" min="1" max="5" value="2"></label>
</div>
<div id="main"><canvas id="view" width="640" height="640"></canvas>
<div><div>input image</div><img id="input" alt="input image"><p id="info"></p>
<p id="help">drag: rotate (about up / tilt) &middot; wheel or +/-: zoom &middot; n / p: next / previous example
&middot; i f s t: views</p></div></div>
<script type="application/json" id="dpcr-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("dpcr-data").textContent);
const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
const state = { ex: 0, rot: null, zoom: 1, shown: {}, clouds: [], centre: [0, 0, 0], radius: 1 };

function decode(c) {
  const bin = atob(c.f32), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer, 0, c.n * 3);
}
function mul(a, b) {  // 3x3 row-major
  const r = new Array(9).fill(0);
  for (let i = 0; i < 3; i++) for (let j = 0; j < 3; j++) for (let k = 0; k < 3; k++) r[3*i+j] += a[3*i+k] * b[3*k+j];
  return r;
}
function axisAngle(u, t) {  // rotation by t about unit axis u
  const c = Math.cos(t), s = Math.sin(t), C = 1 - c, [x, y, z] = u;
  return [c + x*x*C, x*y*C - z*s, x*z*C + y*s, y*x*C + z*s, c + y*y*C, y*z*C - x*s, z*x*C - y*s, z*y*C + x*s, c + z*z*C];
}
function hex(c) { return [1, 3, 5].map(i => parseInt(c.substr(i, 2), 16)); }

function loadExample(i) {
  state.ex = i;
  const ex = DATA.examples[i];
  state.clouds = Object.keys(ex.clouds).map(k => ({ label: k, pts: decode(ex.clouds[k]) }));
  let lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
  for (const c of state.clouds) for (let j = 0; j < c.pts.length; j++) {
    const a = j % 3; lo[a] = Math.min(lo[a], c.pts[j]); hi[a] = Math.max(hi[a], c.pts[j]);
  }
  state.centre = lo.map((v, a) => (v + hi[a]) / 2);
  let r = 1e-9;
  for (const c of state.clouds) for (let j = 0; j < c.pts.length; j += 3) {
    const dx = c.pts[j] - state.centre[0], dy = c.pts[j+1] - state.centre[1], dz = c.pts[j+2] - state.centre[2];
    r = Math.max(r, Math.sqrt(dx*dx + dy*dy + dz*dz));
  }
  state.radius = r;
  const toggles = document.getElementById("toggles");
  toggles.innerHTML = "";
  for (const c of state.clouds) {
    if (!(c.label in state.shown)) state.shown[c.label] = true;
    const lab = document.createElement("label"), box = document.createElement("input"), sw = document.createElement("span");
    box.type = "checkbox"; box.checked = state.shown[c.label]; box.dataset.cloud = c.label;
    box.onchange = () => { state.shown[c.label] = box.checked; draw(); };
    sw.className = "swatch"; sw.style.background = DATA.colors[c.label] || "#555";
    lab.append(box, sw, c.label + " (" + (c.pts.length / 3) + ") ");
    toggles.append(lab);
  }
  const img = document.getElementById("input");
  if (ex.image) { img.src = ex.image; img.style.display = ""; } else img.style.display = "none";
  document.getElementById("pick").value = String(i);
  document.querySelector('button[data-view="input"]').disabled = !ex.input_rotation;
  setView(ex.input_rotation ? "input" : "front");
}

function setView(name) {
  const ex = DATA.examples[state.ex];
  state.rot = (name === "input" && ex.input_rotation) ? ex.input_rotation.slice() : DATA.views[name].slice();
  state.view = name; state.zoom = 1; draw();
}

function draw() {
  const W = canvas.width, H = canvas.height, img = ctx.createImageData(W, H), px = img.data;
  for (let j = 0; j < px.length; j++) px[j] = 255;
  const zbuf = new Float32Array(W * H).fill(-Infinity), R = state.rot, c0 = state.centre;
  const dist = 4 * state.radius, scale = state.zoom * 0.45 * Math.min(W, H) / state.radius;
  const size = Number(document.getElementById("size").value), half = Math.floor(size / 2);
  let drawn = 0;
  for (const c of state.clouds) {
    if (!state.shown[c.label]) continue;
    const col = hex(DATA.colors[c.label] || "#555555"), p = c.pts;
    for (let j = 0; j < p.length; j += 3) {
      const x = p[j] - c0[0], y = p[j+1] - c0[1], z = p[j+2] - c0[2];
      const vx = R[0]*x + R[1]*y + R[2]*z, vy = R[3]*x + R[4]*y + R[5]*z, vz = R[6]*x + R[7]*y + R[8]*z;
      const persp = dist / (dist - vz), sx = Math.round(W / 2 + scale * persp * vx), sy = Math.round(H / 2 - scale * persp * vy);
      const shade = 0.45 + 0.55 * Math.min(1, Math.max(0, (vz / state.radius + 1) / 2));
      let hit = false;
      for (let dy = -half; dy < size - half; dy++) for (let dx = -half; dx < size - half; dx++) {
        const X = sx + dx, Y = sy + dy;
        if (X < 0 || Y < 0 || X >= W || Y >= H || zbuf[Y*W + X] >= vz) continue;
        zbuf[Y*W + X] = vz; hit = true;
        const o = 4 * (Y*W + X);
        px[o] = 255 - shade * (255 - col[0]); px[o+1] = 255 - shade * (255 - col[1]); px[o+2] = 255 - shade * (255 - col[2]);
      }
      if (hit) drawn++;
    }
  }
  ctx.putImageData(img, 0, 0);
  document.body.dataset.drawnPoints = String(drawn);
  document.body.dataset.example = String(state.ex);
  document.body.dataset.view = state.view;
  const ex = DATA.examples[state.ex];
  document.getElementById("info").textContent = ex.name + " | frame: " + DATA.frame + " | view: " + state.view +
    (ex.input_rotation ? "" : " (input camera unknown)") + " | zoom " + state.zoom.toFixed(2);
}

let drag = null;
canvas.addEventListener("pointerdown", e => { drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
canvas.addEventListener("pointerup", () => { drag = null; });
canvas.addEventListener("pointermove", e => {
  if (!drag) return;
  const dx = e.clientX - drag[0], dy = e.clientY - drag[1];
  drag = [e.clientX, e.clientY];
  state.rot = mul(state.rot, axisAngle(DATA.up, dx * 0.01));       // turn about the frame's up axis
  state.rot = mul(axisAngle([1, 0, 0], dy * 0.01), state.rot);      // tilt about the screen's x axis
  state.view = "free"; draw();
});
canvas.addEventListener("wheel", e => { e.preventDefault(); state.zoom *= Math.exp(-e.deltaY * 0.001); draw(); },
                        { passive: false });
document.querySelectorAll("button[data-view]").forEach(b => b.onclick = () => setView(b.dataset.view));
document.getElementById("size").oninput = draw;
const pick = document.getElementById("pick");
DATA.examples.forEach((ex, i) => { const o = document.createElement("option"); o.value = String(i); o.textContent = ex.name; pick.append(o); });
pick.onchange = () => loadExample(Number(pick.value));
document.addEventListener("keydown", e => {
  const n = DATA.examples.length, keys = { i: "input", f: "front", s: "side", t: "top" };
  if (e.key === "n") loadExample((state.ex + 1) % n);
  else if (e.key === "p") loadExample((state.ex + n - 1) % n);
  else if (e.key === "+" || e.key === "=") { state.zoom *= 1.2; draw(); }
  else if (e.key === "-") { state.zoom /= 1.2; draw(); }
  else if (keys[e.key] && !(e.key === "i" && !DATA.examples[state.ex].input_rotation)) setView(keys[e.key]);
});
document.getElementById("title").textContent = (DATA.title || "point clouds") +
  (DATA.total_examples > DATA.examples.length ? " (first " + DATA.examples.length + " of " + DATA.total_examples + ")" : "");
const start = Number((location.hash.match(/ex=(\d+)/) || [0, 0])[1]);
loadExample(Math.min(start, DATA.examples.length - 1));
const v = (location.hash.match(/view=(\w+)/) || [0, null])[1];
if (v && (v in DATA.views || v === "input")) setView(v);
</script>
</body></html>
"""
