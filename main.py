"""reco-jax entry point: `python main.py --config=configs/<dataset>.py[:method=M,variant=V] --workdir=W [--mode=eval]`.

Training resumes automatically from the latest checkpoint in the workdir. Evaluation
restores the latest state onto however many devices exist and evaluates the weights the
method evaluates during training (e.g. the mean teacher's teacher).
"""
import os
import time

# Before anything loads TensorFlow or XLA: their C++ INFO notices stay off the console.
from reco_jax import console
_NATIVE_ENV_SET = console.quiet_native_logs()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from reco_jax import errors  # noqa: E402  (plain Python: loads neither TF nor XLA)

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
flags.DEFINE_bool("allow_config_change", False,
                  "Resume or evaluate a workdir with a config that differs from its checkpoint's in "
                  "fields that change the model, method or data (normally a one-line error).")
flags.DEFINE_bool("verbose_errors", None,
                  "Print the traceback of the project's one-line errors (config, data, workdir, "
                  "non-finite loss). Default: on when RECO_JAX_VERBOSE_ERRORS=1.")
flags.DEFINE_bool("list", False, "Print the datasets, methods, method presets and config "
                  "variants, then exit (no --workdir needed).")
flags.register_multi_flags_validator(["workdir", "list"], lambda f: bool(f["workdir"] or f["list"]),
                                     message="--workdir is required (except with --list)")


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
  started = time.monotonic()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  verbose = console.verbose_requested(FLAGS["verbosity"])
  console.configure_logging(verbose, _NATIVE_ENV_SET)
  with console.native_stderr_filtered(enabled=not verbose):
    import tensorflow as tf
  if FLAGS.list:
    for line in console.collect_listing(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "configs")):
      print(line)
    return
  # tf.data only feeds the host; keep TF off the accelerators JAX owns.
  tf.config.set_visible_devices([], "GPU")
  _maybe_initialize_distributed()

  import jax
  from reco_jax import evaluate, train
  logging.info("JAX process %d / %d, %d local devices, %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  config = FLAGS.config
  console.line(console.header_line(FLAGS.mode, config.method_preset, config.input.dataset,
                                   config.num_train_steps, jax.device_count(),
                                   jax.devices()[0].platform, jax.process_count(), FLAGS.workdir))
  try:
    if FLAGS.mode == "train":
      results = train.train_and_evaluate(config, FLAGS.workdir,
                                         allow_config_change=FLAGS.allow_config_change)
    else:
      results = evaluate.evaluate_checkpoint(config, FLAGS.workdir,
                                             allow_config_change=FLAGS.allow_config_change)
  except errors.ONE_LINE_ERRORS as e:
    _exit_with_one_line(e)
  _print_summary(results, time.monotonic() - started)


def _exit_with_one_line(error: BaseException) -> None:
  """Prints `error` as one line on stderr and exits 1 (143 after SIGTERM); the traceback
  only with --verbose_errors or RECO_JAX_VERBOSE_ERRORS=1."""
  import sys
  import traceback
  verbose = FLAGS.verbose_errors
  if verbose is None:
    verbose = os.environ.get("RECO_JAX_VERBOSE_ERRORS") == "1"
  if verbose:
    traceback.print_exception(error)
  console.error(f"error: {errors.one_line(error)}")  # on a line of its own, after any progress bar
  sys.exit(getattr(error, "exit_code", 1))


def _print_summary(results: dict, wall_seconds: float) -> None:
  """The closing lines (process 0): final/best mIoU, wall time and where everything is."""
  from reco_jax import checkpointing
  if results:
    logging.info("final eval: mIoU %.4f, pixel accuracy %.4f", results["miou"], results["pixel_accuracy"])
  workdir = FLAGS.workdir
  eval_json = (os.path.join(workdir, f"eval_{FLAGS.config.input.eval_split}.json")
               if FLAGS.mode == "eval" else None)
  for line in console.summary_lines(
      FLAGS.mode, results, wall_seconds, workdir=workdir,
      metrics_path=os.path.join(workdir, "metrics.jsonl"),
      checkpoint_dir=console.latest_step_dir(os.path.join(workdir, checkpointing.RESUME_DIR)),
      best_dir=console.latest_step_dir(os.path.join(workdir, checkpointing.BEST_DIR)),
      eval_json=eval_json):
    console.line(line)


if __name__ == "__main__":
  app.run(main)
