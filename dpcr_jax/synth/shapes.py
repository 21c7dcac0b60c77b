"""Procedural ShapeNet-like meshes for the 13 R2N2 categories (docs/original.md §10).

Each shape is a union (concatenation, interior faces kept, as in ShapeNet CAD models) of boxes,
cylinders, capsules, spheres and frusta with randomised proportions and optional parts. Frame:
+Y up, front +X, width along Z; bounding box centred at the origin with diagonal 1.
The shapes are recognisable caricatures, not ShapeNet models: use them to exercise the pipeline and
as a toy benchmark, not to report ShapeNet numbers.
"""
from typing import Callable

import numpy as np
import trimesh

from dpcr_jax.data import categories

_SECTIONS = 16
Mesh = tuple[np.ndarray, np.ndarray]  # vertices [V,3] float, faces [F,3] int


def _box(size, center, rot_z_deg: float = 0.0) -> trimesh.Trimesh:
  """Axis-aligned box of extents `size` at `center`, optionally tilted about Z (pitch in the X-Y plane)."""
  m = trimesh.creation.box(extents=size)
  if rot_z_deg:
    m.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(rot_z_deg), [0, 0, 1]))
  m.apply_translation(center)
  return m


def _cyl(p0, p1, radius) -> trimesh.Trimesh:
  """Cylinder between points p0 and p1."""
  return trimesh.creation.cylinder(radius=radius, segment=np.array([p0, p1], float), sections=_SECTIONS)


def _frustum(p0, p1, r0, r1) -> trimesh.Trimesh:
  """Truncated cone from p0 (radius r0) to p1 (radius r1)."""
  m = trimesh.creation.cylinder(radius=1.0, height=1.0, sections=_SECTIONS)
  v = m.vertices.copy()
  top = v[:, 2] > 0
  v[:, :2] *= np.where(top, r1, r0)[:, None]
  v[:, 2] += 0.5
  axis = np.asarray(p1, float) - np.asarray(p0, float)
  length = np.linalg.norm(axis)
  v[:, 2] *= length
  rot = trimesh.geometry.align_vectors([0, 0, 1], axis / length)
  v = v @ rot[:3, :3].T + np.asarray(p0, float)
  return trimesh.Trimesh(v, m.faces, process=False)


def _beam(p0, p1, thick) -> trimesh.Trimesh:
  """Square-section bar from p0 to p1."""
  axis = np.asarray(p1, float) - np.asarray(p0, float)
  length = np.linalg.norm(axis)
  m = trimesh.creation.box(extents=[thick, thick, length])
  m.apply_transform(trimesh.geometry.align_vectors([0, 0, 1], axis / length))
  m.apply_translation((np.asarray(p0, float) + np.asarray(p1, float)) / 2)
  return m


def _capsule(p0, p1, radius) -> trimesh.Trimesh:
  axis = np.asarray(p1, float) - np.asarray(p0, float)
  length = np.linalg.norm(axis)
  m = trimesh.creation.capsule(height=length, radius=radius, count=[_SECTIONS, _SECTIONS])
  m.apply_transform(trimesh.geometry.align_vectors([0, 0, 1], axis / length))
  m.apply_translation((np.asarray(p0, float) + np.asarray(p1, float)) / 2)
  return m


def _sphere(center, radius) -> trimesh.Trimesh:
  m = trimesh.creation.icosphere(subdivisions=1, radius=radius)
  m.apply_translation(center)
  return m


def _wing(root_x, span_z, chord, sweep, thickness, y, taper) -> trimesh.Trimesh:
  """A swept, tapered slab from z=0 to z=span_z (negative span mirrors)."""
  m = trimesh.creation.box(extents=[1.0, thickness, 1.0])
  v = m.vertices.copy()
  t = v[:, 2] + 0.5  # 0 at root, 1 at tip
  scale = 1.0 - (1.0 - taper) * t
  v[:, 0] = root_x + v[:, 0] * chord * scale - sweep * t
  v[:, 2] = t * span_z
  v[:, 1] += y
  return trimesh.Trimesh(v, m.faces, process=False)


def _u(rng, lo, hi):
  return float(rng.uniform(lo, hi))


def _legs(parts, half_x, half_z, top_y, bottom_y, thick, round_legs, splay=0.0):
  """Four legs at (+-half_x, +-half_z), optionally splayed outwards at the bottom."""
  for sx in (-1, 1):
    for sz in (-1, 1):
      top = [sx * half_x, top_y, sz * half_z]
      bot = [sx * (half_x + splay), bottom_y, sz * (half_z + splay)]
      parts.append(_cyl(bot, top, thick / 2) if round_legs else _beam(bot, top, thick))
  return parts


def chair(rng) -> list:
  w, d = _u(rng, 0.4, 0.6), _u(rng, 0.4, 0.6)
  seat_y, seat_t = _u(rng, 0.35, 0.5), _u(rng, 0.03, 0.1)
  back_h, tilt = _u(rng, 0.3, 0.7), _u(rng, 0, 18)
  leg_t = _u(rng, 0.025, 0.07)
  parts = [_box([d, seat_t, w], [0, seat_y, 0])]
  back_t = _u(rng, 0.02, 0.08)
  back = _box([back_t, back_h, w * _u(rng, 0.8, 1.0)], [0, back_h / 2, 0], rot_z_deg=tilt)
  back.apply_translation([-d / 2 + back_t / 2, seat_y + seat_t / 2, 0])
  parts.append(back)
  if rng.random() < 0.2:  # swivel base: column plus a 5-spoke star
    parts.append(_cyl([0, 0.06, 0], [0, seat_y, 0], _u(rng, 0.02, 0.04)))
    for k in range(5):
      a = 2 * np.pi * k / 5
      parts.append(_cyl([0, 0.04, 0], [0.3 * d * 1.4 * np.cos(a), 0.02, 0.3 * w * 1.4 * np.sin(a)], 0.02))
  else:
    _legs(parts, d / 2 - leg_t, w / 2 - leg_t, seat_y, 0.0, leg_t, rng.random() < 0.5,
          splay=_u(rng, 0, 0.04))
    if rng.random() < 0.35:  # rungs
      parts.append(_cyl([d / 2 - leg_t, 0.12, -w / 2 + leg_t], [d / 2 - leg_t, 0.12, w / 2 - leg_t], leg_t / 3))
      parts.append(_cyl([-d / 2 + leg_t, 0.12, -w / 2 + leg_t], [-d / 2 + leg_t, 0.12, w / 2 - leg_t], leg_t / 3))
  if rng.random() < 0.4:  # armrests
    arm_h = _u(rng, 0.15, 0.25)
    for sz in (-1, 1):
      parts.append(_box([d * 0.9, 0.04, 0.05], [0, seat_y + arm_h, sz * (w / 2 - 0.025)]))
      parts.append(_box([0.04, arm_h, 0.04], [d / 2 - 0.06, seat_y + arm_h / 2, sz * (w / 2 - 0.025)]))
  return parts


def table(rng) -> list:
  top_t = _u(rng, 0.02, 0.07)
  if rng.random() < 0.3:  # round pedestal table
    r, h = _u(rng, 0.3, 0.6), _u(rng, 0.4, 0.75)
    parts = [_cyl([0, h - top_t, 0], [0, h, 0], r), _cyl([0, 0.03, 0], [0, h, 0], _u(rng, 0.03, 0.07)),
             _cyl([0, 0, 0], [0, 0.03, 0], r * _u(rng, 0.35, 0.6))]
    return parts
  length, width, h = _u(rng, 0.7, 1.6), _u(rng, 0.4, 0.9), _u(rng, 0.3, 0.75)
  leg_t = _u(rng, 0.03, 0.08)
  parts = [_box([length, top_t, width], [0, h - top_t / 2, 0])]
  inset = _u(rng, 0.0, 0.08)
  _legs(parts, length / 2 - leg_t - inset, width / 2 - leg_t - inset, h - top_t, 0.0, leg_t,
        rng.random() < 0.4)
  if rng.random() < 0.35:  # lower shelf
    parts.append(_box([length - 2 * inset, 0.02, width - 2 * inset], [0, h * _u(rng, 0.15, 0.35), 0]))
  if rng.random() < 0.3:  # apron
    parts.append(_box([length - 2 * inset, 0.06, width - 2 * inset], [0, h - top_t - 0.03, 0]))
  return parts


def sofa(rng) -> list:
  length, depth = _u(rng, 1.0, 2.0), _u(rng, 0.6, 0.9)
  base_h, leg_h = _u(rng, 0.2, 0.3), _u(rng, 0.0, 0.08)
  back_h, back_t = _u(rng, 0.3, 0.5), _u(rng, 0.12, 0.25)
  parts = [_box([depth, base_h, length], [0, leg_h + base_h / 2, 0]),
           _box([back_t, back_h, length], [-depth / 2 + back_t / 2, leg_h + base_h + back_h / 2, 0])]
  arm_w = 0.0
  if rng.random() < 0.85:
    arm_w, arm_h = _u(rng, 0.08, 0.2), _u(rng, 0.12, 0.3)
    for sz in (-1, 1):
      parts.append(_box([depth, base_h + arm_h, arm_w], [0, leg_h + (base_h + arm_h) / 2, sz * (length / 2 + arm_w / 2)]))
  n_cush = int(rng.integers(1, 4))
  cush_h = _u(rng, 0.06, 0.12)
  cw = length / n_cush
  for k in range(n_cush):
    parts.append(_box([depth - back_t, cush_h, cw * 0.96],
                      [back_t / 2, leg_h + base_h + cush_h / 2, -length / 2 + cw * (k + 0.5)]))
  if leg_h > 0.02:
    _legs(parts, depth / 2 - 0.04, length / 2 + arm_w - 0.04, leg_h, 0.0, 0.04, True)
  return parts


def bench(rng) -> list:
  length, depth, h, t = _u(rng, 1.0, 2.0), _u(rng, 0.25, 0.5), _u(rng, 0.3, 0.5), _u(rng, 0.03, 0.08)
  parts = [_box([depth, t, length], [0, h - t / 2, 0])]
  if rng.random() < 0.5:  # side panels
    for sz in (-1, 1):
      parts.append(_box([depth * 0.9, h - t, 0.04], [0, (h - t) / 2, sz * (length / 2 - 0.08)]))
  else:
    _legs(parts, depth / 2 - 0.04, length / 2 - 0.06, h - t, 0.0, 0.04, rng.random() < 0.5)
  if rng.random() < 0.5:  # backrest
    back_h = _u(rng, 0.25, 0.45)
    for sz in (-1, 1):
      parts.append(_box([0.04, back_h, 0.04], [-depth / 2 + 0.02, h + back_h / 2, sz * (length / 2 - 0.08)]))
    parts.append(_box([0.03, back_h * 0.4, length * 0.95], [-depth / 2 + 0.02, h + back_h * 0.75, 0]))
  return parts


def cabinet(rng) -> list:
  w, d, h = _u(rng, 0.4, 1.0), _u(rng, 0.3, 0.6), _u(rng, 0.5, 1.4)
  leg_h = _u(rng, 0.0, 0.1) if rng.random() < 0.4 else 0.0
  parts = [_box([d, h, w], [0, leg_h + h / 2, 0])]
  n = int(rng.integers(1, 5))
  side_by_side = rng.random() < 0.3 and n >= 2
  for k in range(n):
    if side_by_side:
      dz, dy = w / n, h
      c = [d / 2 + 0.01, leg_h + h / 2, -w / 2 + dz * (k + 0.5)]
    else:
      dz, dy = w, h / n
      c = [d / 2 + 0.01, leg_h + dy * (k + 0.5), 0]
    parts.append(_box([0.02, dy * 0.92, dz * 0.92], c))
    parts.append(_box([0.03, 0.02, min(0.12, dz * 0.4)], [c[0] + 0.02, c[1] + (dy * 0.3 if not side_by_side else 0), c[2]]))
  if leg_h > 0.02:
    _legs(parts, d / 2 - 0.04, w / 2 - 0.04, leg_h, 0.0, 0.04, True)
  return parts


def monitor(rng) -> list:
  w, h, t = _u(rng, 0.5, 1.0), _u(rng, 0.3, 0.6), _u(rng, 0.02, 0.08)
  neck_h = _u(rng, 0.05, 0.25)
  foot = [_u(rng, 0.15, 0.3), 0.03, _u(rng, 0.2, 0.45)]
  parts = [_box(foot, [0, 0.015, 0]), _box([0.04, neck_h + h / 2, 0.06], [-0.03, (neck_h + h / 2) / 2, 0]),
           _box([t, h, w], [0, neck_h + h / 2, 0])]
  if rng.random() < 0.4:  # thick CRT-ish back
    parts.append(_box([_u(rng, 0.1, 0.3), h * 0.7, w * 0.7], [-0.1, neck_h + h / 2, 0]))
  return parts


def speaker(rng) -> list:
  w, d, h = _u(rng, 0.2, 0.5), _u(rng, 0.2, 0.5), _u(rng, 0.3, 1.0)
  parts = [_box([d, h, w], [0, h / 2, 0])]
  n = int(rng.integers(1, 4))
  for k in range(n):
    r = min(w, h / n) * _u(rng, 0.25, 0.42)
    y = h * (k + 0.5) / n
    parts.append(_cyl([d / 2, y, 0], [d / 2 + 0.02, y, 0], r))
  if rng.random() < 0.3:
    parts.append(_box([d, 0.03, w * 1.1], [0, -0.015, 0]))
  return parts


def telephone(rng) -> list:
  w, h, t = _u(rng, 0.25, 0.45), _u(rng, 0.5, 1.0), _u(rng, 0.03, 0.1)
  parts = [_box([t, h, w], [0, h / 2, 0]), _box([0.01, h * 0.7, w * 0.85], [t / 2 + 0.005, h * 0.55, 0])]
  if rng.random() < 0.4:  # keypad
    for i in range(3):
      for j in range(3):
        parts.append(_box([0.015, 0.03, 0.04], [t / 2 + 0.007, h * 0.05 + 0.05 * i + 0.03, (j - 1) * w * 0.28]))
  if rng.random() < 0.3:  # antenna
    parts.append(_cyl([0, h, w * 0.35], [0, h + _u(rng, 0.1, 0.25), w * 0.35], 0.012))
  return parts


def lamp(rng) -> list:
  floor = rng.random() < 0.5
  h = _u(rng, 1.2, 1.8) if floor else _u(rng, 0.4, 0.8)
  base_r, pole_r = _u(rng, 0.1, 0.25), _u(rng, 0.01, 0.025)
  parts = [_cyl([0, 0, 0], [0, _u(rng, 0.02, 0.06), 0], base_r)]
  top = np.array([0.0, h, 0.0])
  if rng.random() < 0.4:  # bent arm
    elbow = np.array([0.0, h * _u(rng, 0.5, 0.8), 0.0])
    top = elbow + np.array([_u(rng, 0.15, 0.4), _u(rng, 0.0, 0.2), 0.0])
    parts += [_cyl([0, 0, 0], elbow, pole_r), _cyl(elbow, top, pole_r), _sphere(elbow, pole_r * 1.5)]
  else:
    parts.append(_cyl([0, 0, 0], top, pole_r))
  shade_h = _u(rng, 0.15, 0.35)
  r_top, r_bot = _u(rng, 0.05, 0.15), _u(rng, 0.12, 0.3)
  parts.append(_frustum(top - [0, shade_h * 0.6, 0], top + [0, shade_h * 0.4, 0], r_bot, r_top))
  return parts


def airplane(rng) -> list:
  length, r = _u(rng, 1.0, 1.6), _u(rng, 0.05, 0.1)
  parts = [_capsule([-length / 2, 0, 0], [length / 2, 0, 0], r)]
  span, chord = _u(rng, 0.5, 0.9), _u(rng, 0.15, 0.35)
  sweep, wing_y = _u(rng, 0.0, 0.3), _u(rng, -0.6, 0.4) * r
  wing_x = _u(rng, -0.05, 0.15)
  for s in (-1, 1):
    parts.append(_wing(wing_x, s * span, chord, sweep, 0.02, wing_y, _u(rng, 0.3, 0.7)))
    parts.append(_wing(-length / 2 + 0.05, s * span * 0.35, chord * 0.5, sweep * 0.4, 0.015, 0.0, 0.5))
  fin = _wing(-length / 2 + 0.08, 1.0, chord * 0.6, sweep * 0.5, 0.015, 0.0, 0.5)
  v = fin.vertices.copy()
  v[:, [1, 2]] = v[:, [2, 1]] * [_u(rng, 0.15, 0.3), 1.0]  # rotate the slab to stand vertically
  parts.append(trimesh.Trimesh(v, fin.faces, process=False))
  n_eng = int(rng.choice([0, 2, 4]))
  for k in range(n_eng // 2):
    for s in (-1, 1):
      z = s * span * (0.3 + 0.3 * k)
      x = wing_x - sweep * abs(z) / span
      parts.append(_cyl([x + 0.05, wing_y - 0.06, z], [x - 0.15, wing_y - 0.06, z], r * 0.5))
  return parts


def car(rng) -> list:
  length, width = _u(rng, 0.9, 1.3), _u(rng, 0.4, 0.55)
  body_h, clearance = _u(rng, 0.12, 0.25), _u(rng, 0.05, 0.12)
  cab_len, cab_h = length * _u(rng, 0.35, 0.7), _u(rng, 0.1, 0.22)
  wheel_r = _u(rng, 0.07, 0.12)
  parts = [_box([length, body_h, width], [0, clearance + body_h / 2, 0])]
  cab = _box([cab_len, cab_h, width * 0.9], [_u(rng, -0.15, 0.05) * length, clearance + body_h + cab_h / 2, 0])
  v = cab.vertices.copy()
  v[v[:, 1] > clearance + body_h + cab_h / 2 - 1e-6, 0] *= 0.75  # slanted wind screens
  parts.append(trimesh.Trimesh(v, cab.faces, process=False))
  for sx in (-1, 1):
    for sz in (-1, 1):
      x = sx * (length / 2 - wheel_r * 1.3)
      parts.append(_cyl([x, wheel_r, sz * width / 2 - 0.02 * sz], [x, wheel_r, sz * (width / 2 + 0.03)], wheel_r))
  if rng.random() < 0.25:  # spoiler
    parts.append(_box([0.08, 0.02, width * 0.9], [-length / 2 + 0.05, clearance + body_h + 0.06, 0]))
    for sz in (-1, 1):
      parts.append(_box([0.03, 0.06, 0.02], [-length / 2 + 0.05, clearance + body_h + 0.03, sz * width * 0.35]))
  return parts


def rifle(rng) -> list:
  barrel_l, recv_l = _u(rng, 0.5, 0.9), _u(rng, 0.25, 0.4)
  recv_h = _u(rng, 0.06, 0.12)
  parts = [_cyl([recv_l / 2, 0, 0], [recv_l / 2 + barrel_l, 0, 0], _u(rng, 0.01, 0.025)),
           _box([recv_l, recv_h, 0.05], [0, 0, 0])]
  stock = _box([_u(rng, 0.25, 0.4), recv_h * _u(rng, 1.0, 1.6), 0.045], [0, 0, 0], rot_z_deg=_u(rng, 0, 12))
  stock.apply_translation([-recv_l / 2 - 0.15, -0.03, 0])
  parts.append(stock)
  grip = _box([0.04, 0.12, 0.04], [0, 0, 0], rot_z_deg=-15)
  grip.apply_translation([-recv_l / 4, -recv_h / 2 - 0.05, 0])
  parts.append(grip)
  if rng.random() < 0.5:  # scope
    parts.append(_cyl([-recv_l / 3, recv_h / 2 + 0.04, 0], [recv_l / 2, recv_h / 2 + 0.04, 0], 0.02))
  if rng.random() < 0.6:  # magazine
    parts.append(_box([0.05, _u(rng, 0.08, 0.18), 0.03], [recv_l / 4, -recv_h / 2 - 0.06, 0]))
  if rng.random() < 0.4:  # handguard
    parts.append(_box([barrel_l * 0.4, 0.05, 0.05], [recv_l / 2 + barrel_l * 0.2, 0, 0]))
  return parts


def vessel(rng) -> list:
  length, beam, hull_h = _u(rng, 1.0, 1.6), _u(rng, 0.2, 0.4), _u(rng, 0.1, 0.25)
  hull = trimesh.creation.box(extents=[length, hull_h, beam])
  v = hull.vertices.copy()
  bottom = v[:, 1] < 0
  v[bottom, 2] *= _u(rng, 0.2, 0.6)  # V-shaped bottom
  v[bottom, 0] *= _u(rng, 0.8, 0.95)
  bow = v[:, 0] > 0
  v[bow & (v[:, 1] > 0), 0] += _u(rng, 0.05, 0.2)  # raked bow
  v[bow, 2] *= 0.15  # pointed bow
  parts = [trimesh.Trimesh(v + [0, hull_h / 2, 0], hull.faces, process=False)]
  n_decks = int(rng.integers(1, 4))
  deck_l, y = length * _u(rng, 0.2, 0.5), hull_h
  x0 = _u(rng, -0.25, 0.05) * length
  for _ in range(n_decks):
    dh = _u(rng, 0.05, 0.12)
    parts.append(_box([deck_l, dh, beam * 0.7], [x0, y + dh / 2, 0]))
    y += dh
    deck_l *= 0.7
  if rng.random() < 0.6:  # mast
    parts.append(_cyl([x0 + 0.1, hull_h, 0], [x0 + 0.1, y + _u(rng, 0.1, 0.5), 0], 0.012))
  return parts


BUILDERS: dict[str, Callable[[np.random.Generator], list]] = {
    "airplane": airplane, "bench": bench, "cabinet": cabinet, "car": car, "chair": chair,
    "monitor": monitor, "lamp": lamp, "speaker": speaker, "rifle": rifle, "sofa": sofa,
    "table": table, "telephone": telephone, "vessel": vessel,
}
assert sorted(BUILDERS) == sorted(categories.NAMES)


def normalize(vertices: np.ndarray) -> np.ndarray:
  """Centres the bounding box at the origin and scales its diagonal to 1."""
  lo, hi = vertices.min(0), vertices.max(0)
  return (vertices - (lo + hi) / 2) / np.linalg.norm(hi - lo)


def make_shape(category: str, rng: np.random.Generator) -> Mesh:
  """Random mesh of a category (name or synset): (vertices [V,3] f64, faces [F,3] int64), diag 1, +Y up."""
  name = categories.NAMES[categories.SYNSET_TO_INDEX[categories.resolve_categories([category])[0]]]
  parts = BUILDERS[name](rng)
  # Small random anisotropic scaling for extra within-category variety.
  mesh = trimesh.util.concatenate(parts)
  vertices = mesh.vertices * rng.uniform(0.9, 1.1, size=3)
  return normalize(vertices), np.asarray(mesh.faces, np.int64)


def write_obj(path, vertices: np.ndarray, faces: np.ndarray) -> None:
  """Minimal triangle OBJ (ShapeNetCore.v1 style: 'v x y z' and 1-based 'f a b c')."""
  with open(path, "w") as f:
    f.write("".join(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in vertices))
    f.write("".join(f"f {a} {b} {c}\n" for a, b, c in faces + 1))
