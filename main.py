"""reco-jax entry point: `python main.py --config=configs/x.py[:variant] --workdir=W [--mode=eval]`.

Training resumes automatically from the latest checkpoint in the workdir. Evaluation
restores the weights (the teacher when there is one) onto however many devices exist.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.jsonl.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or evaluate a checkpoint.")
flags.DEFINE_bool("jax_distributed", None,
                  "Call jax.distributed.initialize() (TPU pods, multi-host GPU). Default: on when "
                  "RECO_JAX_DISTRIBUTED=1 or a coordinator address is given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs off TPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs off TPU).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs off TPU).")
flags.mark_flags_as_required(["workdir"])


def _maybe_initialize_distributed() -> None:
  import jax
  wanted = FLAGS.jax_distributed
  if wanted is None:
    wanted = os.environ.get("RECO_JAX_DISTRIBUTED") == "1" or FLAGS.coordinator_address is not None
  if wanted:
    # With no arguments JAX auto-detects TPU pods, SLURM and other cluster environments.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import tensorflow as tf
  # tf.data only feeds the host; keep TF off the accelerators JAX owns.
  tf.config.set_visible_devices([], "GPU")
  _maybe_initialize_distributed()

  import jax
  from reco_jax import evaluate, train
  logging.info("JAX process %d / %d, %d local devices, %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  config = FLAGS.config
  if FLAGS.mode == "train":
    results = train.train_and_evaluate(config, FLAGS.workdir)
  else:
    results = evaluate.evaluate_checkpoint(config, FLAGS.workdir)
  if results:
    logging.info("final eval: mIoU %.4f, pixel accuracy %.4f", results["miou"], results["pixel_accuracy"])
    best = f"  (best mIoU {results['best_miou']:.4f})" if "best_miou" in results else ""
    print(f"mIoU {results['miou']:.4f}  pixel accuracy {results['pixel_accuracy']:.4f}{best}")


if __name__ == "__main__":
  app.run(main)
