r"""Evaluates a trained run with the paper's protocol and the baselines; writes CSV + markdown tables.

  python -m experiments.evaluate --checkpoint runs/quickstart/finetune --output runs/quickstart/results

Columns: the model, 'sparse_x16' (its stage-1 points repeated), the image-blind per-view training medoid and
the per-(category, view) oracle medoid. See dpcr_jax/metrics.py for the exact protocol.
"""
from absl import app
from absl import flags

from dpcr_jax import evaluation, train

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory (workdir) of a finetune run.")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: writes <output>.csv and <output>.md.")
_SPLIT = flags.DEFINE_string("split", "test", "Data split.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Override the run's config.data.root.")
_BASELINES = flags.DEFINE_bool("baselines", True, "Also score the medoid baselines.")
_EMD_PER_CAT = flags.DEFINE_integer("emd_examples_per_category", -1,
                                    "Approximate EMD on the first k examples per category (-1: all).")
_EXACT_EMD = flags.DEFINE_integer("exact_emd_clouds", 16, "Clouds for the exact-vs-approximate EMD check.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", -1, "Evaluate at most this many batches (-1: all).")
flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv):
  del argv
  train.quiet_library_logs()
  result = evaluation.evaluate_run(_CHECKPOINT.value, _OUTPUT.value, split=_SPLIT.value,
                                   data_root=_DATA_ROOT.value, baselines=_BASELINES.value,
                                   emd_examples_per_category=_EMD_PER_CAT.value,
                                   exact_emd_clouds=_EXACT_EMD.value, max_batches=_MAX_BATCHES.value)
  with open(result["paths"][1]) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
