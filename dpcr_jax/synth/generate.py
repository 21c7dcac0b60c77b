"""Offline generator of a ShapeNet-like dataset, written in the real on-disk formats (docs/data.md).

Layout under `root` (sizes in folder names follow the options):
  ShapeNetCore.v1/<syn>/<id>/model.obj                          procedural mesh, +Y up, front +X, diag 1
  ShapeNetRendering/<syn>/<id>/rendering/{00..23}.png           137x137 RGBA, R2N2 random views
                                  rendering_metadata.txt, renderings.txt
  ShapeNet_pointclouds/<syn>/<id>/pointcloud_{1024,2048,4096,16k}.npy   canonical frame, FPS-ordered subsets
  splits/{train,val}_models.json                                {"<syn>": ["<syn>/<id>", ...]}, sorted 80/20
  attdpcr/{train,test}/image_<H>_<W>_12/<syn>.h5                'image' uint8 [N*12,H,W,3], black background
  attdpcr/{train,test}/point_<P>_12/<syn>.h5                    'point' float32 [N*12,P,3], camera frame
  attdpcr/rendering_metadata.txt                                the 12 fixed views
  pix3d/pix3d.json, img/, mask/, model/                         optional mini Pix3D (pix3d_images > 0)
Row i of the AttentionDPCR files is model i // 12 (sorted ids of the split), view i % 12.
"""
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time

import h5py
import numpy as np
from PIL import Image
import tqdm

from dpcr_jax.data import camera
from dpcr_jax.data import categories as categories_lib
from dpcr_jax.data import sampling
from dpcr_jax.data.r2n2 import pointcloud_filename
from dpcr_jax.synth import render
from dpcr_jax.synth import shapes


@dataclasses.dataclass(frozen=True)
class GeneratorOptions:
  image_size: int = 256
  n_dense: int = 16384
  n_mid: int = 4096
  n_sparse: int = 1024
  n_views: int = 12
  r2n2_views: int = 24  # 0 = do not write the R2N2 folders
  pix3d_images: int = 0  # > 0: also write a mini Pix3D (pix3d/) with this many photos
  r2n2_image_size: int = camera.R2N2_IMAGE_SIZE
  sampling: str = "deterministic"  # or 'iid'
  renderer: str = "auto"  # 'auto' | 'moderngl' | 'numpy'
  compression: str | None = "lzf"  # HDF5 compression of the image datasets
  fps: str = "auto"  # 'auto' (xla_ops when available) | 'numpy'


def image_folder(height: int, width: int, n_views: int = 12) -> str:
  return f"image_{height}_{width}_{n_views}"


def point_folder(n: int, n_views: int = 12) -> str:
  return f"point_{n}_{n_views}"


def model_id(synset: str, seed: int, index: int) -> str:
  """32-hex id (like ShapeNet's), so that the sorted-split rule behaves as on ShapeNet."""
  return hashlib.md5(f"{synset}/{seed}/{index}".encode()).hexdigest()


def _model_rng(seed: int, synset: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, int(synset), index])


_RENDERERS: dict[str, render.Renderer] = {}  # one per process and backend (a GL context is not picklable)


def _renderer(backend: str) -> render.Renderer:
  """This process's renderer for ``backend`` (before: the first one made, whatever backend was asked for)."""
  if backend not in _RENDERERS:
    _RENDERERS[backend] = render.Renderer(backend)
  return _RENDERERS[backend]


def generate_model(root: str, synset: str, index: int, seed: int, opts: GeneratorOptions) -> dict:
  """Makes one model: writes its OBJ/R2N2/point-cloud files and returns its AttentionDPCR rows.

  Returns dict with 'image' [V,H,W,3] uint8 and 'point_<n>' [V,n,3] float32 for n in the three sizes.
  """
  rng = _model_rng(seed, synset, index)
  mid = model_id(synset, seed, index)
  vertices, faces = shapes.make_shape(synset, rng)
  dense = sampling.sample_surface(vertices, faces, opts.n_dense, rng, opts.sampling)
  # FPS once per model (FPS with a fixed start is invariant under the rigid per-view transforms).
  n_fps = max(opts.n_mid, opts.n_sparse)
  fps = (sampling.farthest_point_indices_numpy(dense, n_fps) if opts.fps == "numpy"
         else sampling.farthest_point_indices(dense, n_fps))
  subsets = {opts.n_dense: np.arange(opts.n_dense), opts.n_mid: fps[:opts.n_mid], opts.n_sparse: fps[:opts.n_sparse]}

  obj_dir = os.path.join(root, "ShapeNetCore.v1", synset, mid)
  os.makedirs(obj_dir, exist_ok=True)
  shapes.write_obj(os.path.join(obj_dir, "model.obj"), vertices, faces)
  pc_dir = os.path.join(root, "ShapeNet_pointclouds", synset, mid)
  os.makedirs(pc_dir, exist_ok=True)
  pc_sizes = dict(subsets)
  if len(fps) >= 2048:
    pc_sizes[2048] = fps[:2048]
  for n, idx in pc_sizes.items():
    np.save(os.path.join(pc_dir, pointcloud_filename(n)), dense[idx])

  rend = _renderer(opts.renderer)
  if opts.r2n2_views:
    _write_r2n2_views(os.path.join(root, "ShapeNetRendering", synset, mid, "rendering"), vertices, faces, rng,
                      opts, rend)

  size = opts.image_size
  focal = camera.attdpcr_focal(size)
  scaled_v = vertices * camera.ATTDPCR_SCALE
  scaled_p = dense.astype(np.float64) * camera.ATTDPCR_SCALE
  images, points = [], []
  for az, el, dist in camera.attdpcr_views(opts.n_views):
    rot, cam_pos = camera.camera_info(az, el, dist)
    images.append(rend.render(scaled_v, faces, rot, cam_pos, focal, size, size)[..., :3])
    points.append(camera.world_to_camera(scaled_p, rot, cam_pos).astype(np.float32))
  points = np.stack(points)
  out = {"image": np.stack(images)}
  for n, idx in subsets.items():
    out[f"point_{n}"] = points[:, idx]
  return out


def _write_r2n2_views(folder, vertices, faces, rng, opts, rend) -> None:
  """R2N2-style random views: az U[0,360), el U[25,30], ratio U[0.65,0.95], camera at 1.75 ratio."""
  os.makedirs(folder, exist_ok=True)
  size = opts.r2n2_image_size
  focal = size * camera.R2N2_FOCAL_PER_PIXEL
  meta = np.zeros((opts.r2n2_views, 5))
  names = []
  for v in range(opts.r2n2_views):
    az, el, ratio = rng.uniform(0, 360), rng.uniform(25, 30), rng.uniform(0.65, 0.95)
    meta[v] = [az, el, 0.0, ratio, 25.0]
    rot, cam_pos = camera.camera_info(az, el, ratio * camera.R2N2_MAX_CAMERA_DIST)
    rgba = rend.render(vertices, faces, rot, cam_pos, focal, size, size)
    names.append(f"{v:02d}.png")
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder, names[-1]), compress_level=1)
  camera.write_rendering_metadata(os.path.join(folder, "rendering_metadata.txt"), meta)
  with open(os.path.join(folder, "renderings.txt"), "w") as f:
    f.write("\n".join(names) + "\n")


def write_mini_pix3d(folder: str, n_images: int, seed: int, renderer: str = "auto", models_per_category: int = 3,
                     occluded_fraction: float = 0.15) -> int:
  """A Pix3D-format mini set: procedural chairs/sofas/tables photographed over noise backgrounds.

  Writes pix3d.json (the real fields: img, mask, category, img_size, bbox, model, rot_mat, trans_mat,
  focal_length (mm, 32 mm sensor), cam_position, inplane_rotation, truncated, occluded, slightly_occluded),
  img/<cat>/NNNN.png, mask/<cat>/NNNN.png and model/<cat>/<name>/model.obj. Approximations: the models stay in
  our frame (+Y up, front +X), not Pix3D's, and rot_mat/trans_mat are our look-at camera (world -> camera,
  looking down -Z), not Pix3D's convention. A fraction of the entries is flagged occluded/truncated so that
  the loader's selection is exercised. Returns the number of entries written.
  """
  rng = np.random.default_rng([seed, 3])
  rend = _renderer(renderer)
  models = []
  for cat in ("chair", "sofa", "table"):
    for k in range(models_per_category):
      rel = f"model/{cat}/{cat}_{k:02d}/model.obj"
      os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
      vertices, faces = shapes.make_shape(cat, rng)
      shapes.write_obj(os.path.join(folder, rel), vertices, faces)
      models.append((cat, rel, vertices, faces))
  entries = []
  for i in range(n_images):
    cat, rel, vertices, faces = models[int(rng.integers(len(models)))]
    width, height = int(rng.integers(160, 321)), int(rng.integers(160, 321))
    focal_mm = rng.uniform(30, 60)
    rot, cam_pos = camera.camera_info(rng.uniform(0, 360), rng.uniform(0, 35), rng.uniform(1.6, 2.6))
    rgba = rend.render(vertices, faces, rot, cam_pos, focal_mm / 32 * width, height, width)
    mask = rgba[..., 3] > 127
    if not mask.any():
      continue
    photo = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    photo = np.round(rgba[..., :3] * alpha + photo * (1 - alpha)).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    img, msk = f"img/{cat}/{i:04d}.png", f"mask/{cat}/{i:04d}.png"
    for path, arr in ((img, photo), (msk, mask.astype(np.uint8) * 255)):
      os.makedirs(os.path.join(folder, os.path.dirname(path)), exist_ok=True)
      Image.fromarray(arr).save(os.path.join(folder, path), compress_level=1)
    occluded = bool(rng.random() < occluded_fraction)
    entries.append({
        "img": img, "mask": msk, "category": cat, "img_size": [width, height], "img_source": "synthetic",
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], "model": rel,
        "rot_mat": rot.tolist(), "trans_mat": (-rot @ cam_pos).tolist(), "focal_length": float(focal_mm),
        "cam_position": cam_pos.tolist(), "inplane_rotation": 0.0, "truncated": False,
        "occluded": occluded, "slightly_occluded": False})
  with open(os.path.join(folder, "pix3d.json"), "w") as f:
    json.dump(entries, f)
  return len(entries)


def _worker(task):
  root, synset, index, seed, opts = task
  return generate_model(root, synset, index, seed, opts)


def generate_synthetic(root: str, models_per_category: int, seed: int = 0, image_size: int = 256,
                       n_dense: int = 16384, n_mid: int = 4096, n_sparse: int = 1024, workers: int = 1,
                       categories: list[str] | None = None, progress: bool = True, **options) -> dict:
  """Generates the dataset under `root`; deterministic given `seed` (independent of `workers`).

  Args:
    root: output folder (created).
    models_per_category: models per category, split 80/20 train/test by sorted id.
    seed: dataset seed.
    image_size: AttentionDPCR image side (the focal length scales with it: 284 px at 256).
    n_dense, n_mid, n_sparse: point counts; mid and sparse are FPS subsets (n_sparse is a prefix of n_mid).
    workers: processes (1 = in this process).
    categories: names or synsets (None = all 13).
    progress: show a tqdm bar.
    **options: further GeneratorOptions fields (n_views, r2n2_views, pix3d_images, sampling, renderer,
      compression, fps).
  Returns:
    Summary dict (counts, seconds, models_per_s, images_per_s, renderer, paths).
  """
  if not 0 < n_sparse <= n_dense or not 0 < n_mid <= n_dense:
    raise ValueError(f"need 0 < n_sparse, n_mid <= n_dense, got {n_sparse=}, {n_mid=}, {n_dense=}")
  if models_per_category < 2:
    raise ValueError(f"models_per_category must be >= 2 (80/20 split), got {models_per_category}")
  opts = GeneratorOptions(image_size=image_size, n_dense=n_dense, n_mid=n_mid, n_sparse=n_sparse, **options)
  synsets = categories_lib.resolve_categories(categories)
  os.makedirs(root, exist_ok=True)
  start = time.time()

  # Ids and splits first: rows of the HDF5 files follow the sorted ids of each split.
  splits = {"train": {}, "test": {}}
  tasks, slots = [], []
  for syn in synsets:
    ids = {model_id(syn, seed, i): i for i in range(models_per_category)}
    train, test = categories_lib.split_models(list(ids))
    for split, split_ids in (("train", train), ("test", test)):
      splits[split][syn] = split_ids
      for row, mid in enumerate(split_ids):
        tasks.append((root, syn, ids[mid], seed, opts))
        slots.append((split, syn, row))
  os.makedirs(os.path.join(root, "splits"), exist_ok=True)
  for split, name in (("train", "train_models.json"), ("test", "val_models.json")):
    with open(os.path.join(root, "splits", name), "w") as f:
      json.dump({syn: [f"{syn}/{m}" for m in ids] for syn, ids in splits[split].items()}, f, indent=1)
  att = os.path.join(root, "attdpcr")
  os.makedirs(att, exist_ok=True)
  camera.write_rendering_metadata(os.path.join(att, "rendering_metadata.txt"),
                                  np.array([[a, e, 0.0, d, 25.0] for a, e, d in camera.attdpcr_views(opts.n_views)]))

  files = _open_h5_files(att, splits, opts)
  v = opts.n_views
  try:
    if workers > 1:
      ctx = multiprocessing.get_context("spawn")  # fresh GL context / JAX runtime per worker
      pool = ctx.Pool(workers)
      results = pool.imap(_worker, tasks, chunksize=1)
    else:
      pool, results = None, map(_worker, tasks)
    for (split, syn, row), out in tqdm.tqdm(zip(slots, results), total=len(tasks), disable=not progress,
                                           desc="models", unit="model"):
      for key, arr in out.items():
        files[(split, syn, key)][row * v:(row + 1) * v] = arr
    if pool is not None:
      pool.close()
      pool.join()
  finally:
    for ds in files.values():
      ds.file.close()
  n_pix3d = write_mini_pix3d(os.path.join(root, "pix3d"), opts.pix3d_images, seed, opts.renderer) \
      if opts.pix3d_images else 0
  seconds = time.time() - start
  n_models = len(tasks)
  n_images = n_models * (opts.n_views + opts.r2n2_views)
  return {
      "root": root, "categories": synsets, "models": n_models,
      "train_models": sum(len(x) for x in splits["train"].values()),
      "test_models": sum(len(x) for x in splits["test"].values()),
      "images": n_images, "seconds": seconds, "models_per_s": n_models / seconds,
      "images_per_s": n_images / seconds, "renderer": _renderer(opts.renderer).backend if workers <= 1 else "per worker",
      "workers": workers, "pix3d_images": n_pix3d, "options": dataclasses.asdict(opts),
  }


def _open_h5_files(att, splits, opts) -> dict:
  """Creates the per-(split, category) HDF5 datasets; returns {(split, syn, key): h5py.Dataset}."""
  size, v = opts.image_size, opts.n_views
  out = {}
  for split, per_syn in splits.items():
    for syn, ids in per_syn.items():
      rows = len(ids) * v
      folder = os.path.join(att, split, image_folder(size, size, v))
      os.makedirs(folder, exist_ok=True)
      f = h5py.File(os.path.join(folder, f"{syn}.h5"), "w")
      out[(split, syn, "image")] = f.create_dataset("image", (rows, size, size, 3), np.uint8,
                                                     chunks=(1, size, size, 3), compression=opts.compression)
      for n in sorted({opts.n_dense, opts.n_mid, opts.n_sparse}):
        folder = os.path.join(att, split, point_folder(n, v))
        os.makedirs(folder, exist_ok=True)
        f = h5py.File(os.path.join(folder, f"{syn}.h5"), "w")
        out[(split, syn, f"point_{n}")] = f.create_dataset("point", (rows, n, 3), np.float32, chunks=(1, n, 3))
  return out

