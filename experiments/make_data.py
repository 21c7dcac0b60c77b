r"""Generates the offline ShapeNet-like synthetic dataset in the real on-disk formats (docs/data.md).

  python experiments/make_data.py --root /tmp/dpcr_synth --models_per_category 8 --image_size 128 \
      --n_dense 4096 --n_mid 1024 --n_sparse 256 --workers 2
"""
import argparse
import json

from dpcr_jax.synth import generate


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True, help="output folder")
  p.add_argument("--models_per_category", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--n_dense", type=int, default=16384)
  p.add_argument("--n_mid", type=int, default=4096)
  p.add_argument("--n_sparse", type=int, default=1024)
  p.add_argument("--workers", type=int, default=1, help="processes")
  p.add_argument("--categories", nargs="*", default=None, help="names or synsets (default: all 13)")
  p.add_argument("--r2n2_views", type=int, default=24, help="R2N2-style views per model (0: skip that layout)")
  p.add_argument("--pix3d_images", type=int, default=0, help="photos in an optional mini Pix3D (0: none)")
  p.add_argument("--sampling", choices=["deterministic", "iid"], default="deterministic")
  p.add_argument("--renderer", choices=["auto", "moderngl", "numpy"], default="auto")
  args = p.parse_args(argv)
  summary = generate.generate_synthetic(
      args.root, args.models_per_category, seed=args.seed, image_size=args.image_size, n_dense=args.n_dense,
      n_mid=args.n_mid, n_sparse=args.n_sparse, workers=args.workers, categories=args.categories,
      r2n2_views=args.r2n2_views, pix3d_images=args.pix3d_images, sampling=args.sampling, renderer=args.renderer)
  print(json.dumps({k: v for k, v in summary.items() if k != "categories"}, indent=1))


if __name__ == "__main__":
  main()
