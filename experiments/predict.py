r"""Point clouds from images with a trained run (PLY + NPY + PNG per image).

  python -m experiments.predict --checkpoint runs/quickstart/finetune --images 'photos/*.png' \
      [--masks 'masks/*.png'] --output predictions/

--checkpoint is a finetune (or sparse) run's workdir; --images a file, a folder or a glob; --masks (optional)
the same number of masks in the same sorted order (white = object; the rest is blacked out as the paper
does for Pix3D). Images that cannot be decoded, or whose prediction is not finite, are listed at the end and
the exit status is 1; the others are written. Output names are the file stems, made distinct when two inputs
share one (a/x.png, b/x.png -> a__x_png, b__x_png).
"""
import sys

from absl import app
from absl import flags

from dpcr_jax import predict, train

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory (workdir) of a finetune or sparse run.")
_IMAGES = flags.DEFINE_string("images", None, "Image file, folder or glob.")
_MASKS = flags.DEFINE_string("masks", None, "Optional mask file, folder or glob (same order as images).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.mark_flags_as_required(["checkpoint", "images", "output"])


def main(argv):
  del argv
  train.quiet_library_logs()
  images = predict.expand_paths(_IMAGES.value)
  masks = predict.expand_paths(_MASKS.value) if _MASKS.value else None
  predictor = predict.Predictor(_CHECKPOINT.value)
  records = predict.predict_files(predictor, images, _OUTPUT.value, masks, _BATCH.value)
  for item in records:
    if "ply" in item:
      print(f"{item['image']} -> {item['ply']}")
  failed = [item["error"] for item in records if "error" in item]
  if failed:  # the others were written; the exit status tells scripts that some were not
    print(f"{len(failed)} of {len(records)} images were not predicted:", *failed, sep="\n  ", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
