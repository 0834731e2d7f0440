"""What a person sees on the console: quiet libraries, a progress bar, readable lines, a summary.

Everything main.py prints during a run goes through this module, and only process 0 prints
(`line`, `TrainProgress`; `error` excepted). The metrics themselves go to TensorBoard and `metrics.jsonl`
(reco_jax/reporting.py); the console only points at them.

Quiet by default. TensorFlow's and XLA's C++ start-up notices, orbax's checkpoint chatter, JAX's
"Unable to initialize backend 'tpu'" and clu's per-step notes are all INFO-level: main.py lowers
the native log level before anything loads TensorFlow (`quiet_native_logs`), filters the two
notices that TensorFlow writes before its logging is even set up (`native_stderr_filtered`) and
raises the Python loggers to WARNING (`configure_logging`). absl's own `--verbosity` flag, when
given (`--verbosity=0` INFO, `--verbosity=1` DEBUG), brings everything back.

Training shows one tqdm bar on a terminal (steps, steps/s, ETA, latest loss, last eval mIoU).
When stdout is not a terminal (a log file, CI, a captured subprocess), a carriage-return bar
would fill the file with redraws, so the same information comes as a plain line every
`log_every_steps` instead, at most about 20 in a run (`progress_interval`).
"""
import contextlib
import importlib
import logging
import math
import os
import re
import sys
import tempfile
import time
import weakref
from typing import Iterable, Mapping, Sequence

from absl import logging as absl_logging
import tqdm

# Native log level for TensorFlow/XLA's C++ logging when the user has not set one:
# 1 hides INFO (oneDNN and CPU-feature notices, XLA start-up), keeps warnings and errors.
NATIVE_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1"}

# Python loggers raised to WARNING by default, besides the root logger (through absl's
# verbosity): named as well in case a library gives its logger its own level.
QUIET_LOGGERS = ("absl", "jax", "orbax", "clu", "tensorflow", "tensorflow_datasets")

# Libraries whose warnings are hidden too by default: orbax warns about its own settings
# (a read-only manager for --mode=eval, the pace of asynchronous saves), nothing a user acts
# on; its failures raise. They log through absl's one logger, so they are told apart by file.
QUIET_WARNINGS_FROM = ("orbax",)

# Native stderr lines that carry nothing for a user. TensorFlow logs its oneDNN notice through
# absl before absl's logging is initialised, and such messages ignore TF_CPP_MIN_LOG_LEVEL,
# so they are filtered out of what the import writes (`native_stderr_filtered`).
NATIVE_CHATTER = (
    re.compile(r"All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"oneDNN custom operations are on"),
)

# Most plain progress lines a non-terminal run writes (besides the first step's and the
# evaluations'): a 40k-step run logging every 100 steps would otherwise print 400.
MAX_PLAIN_PROGRESS_LINES = 20

# Progress bars still open, so that `error` can close them before it prints.
_open_progress: "weakref.WeakSet[TrainProgress]" = weakref.WeakSet()


# ------------------------------------------------------------------------------------------
# Quiet libraries.
# ------------------------------------------------------------------------------------------


def quiet_native_logs() -> tuple[str, ...]:
  """Sets the native log-level variables the user has not set; call before TensorFlow or XLA
  load. Returns the names it set (`configure_logging` raises them again for `--verbosity`)."""
  set_here = tuple(name for name in NATIVE_LOG_ENV if name not in os.environ)
  for name in set_here:
    os.environ[name] = NATIVE_LOG_ENV[name]
  return set_here


def verbose_requested(verbosity_flag) -> bool:
  """Whether the user asked for library logs: absl's `--verbosity` (`-v`) given, at INFO (0)
  or more. absl turns the default -1 into 0 after parsing, so the value alone cannot tell."""
  return bool(verbosity_flag.present) and verbosity_flag.value >= absl_logging.INFO


def configure_logging(verbose: bool, native_env_set: Sequence[str] = ()) -> None:
  """Quiet (the default): Python loggers at WARNING. Verbose: leaves absl's levels as the
  flag set them and lowers the native level set by `quiet_native_logs` back to INFO (it
  takes effect if TensorFlow is not loaded yet)."""
  if verbose:
    for name in native_env_set:
      os.environ[name] = "0"
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, LibraryWarningsFilter) for f in absl_logger.filters):
    absl_logger.addFilter(LibraryWarningsFilter(QUIET_WARNINGS_FROM))


class LibraryWarningsFilter(logging.Filter):
  """Drops records below ERROR logged from inside the given packages' source trees."""

  def __init__(self, packages: Sequence[str]):
    super().__init__()
    self._markers = tuple(f"{os.sep}{package}{os.sep}" for package in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not any(m in record.pathname for m in self._markers)


def drop_native_chatter(text: str) -> str:
  """`text` without the lines that match `NATIVE_CHATTER`."""
  kept = [line for line in text.splitlines(keepends=True)
          if not any(pattern.search(line) for pattern in NATIVE_CHATTER)]
  return "".join(kept)


@contextlib.contextmanager
def native_stderr_filtered(enabled: bool = True):
  """While active, whatever is written to file descriptor 2 (C++ and Python alike) goes to a
  temporary file; on exit it is written back to stderr without the `NATIVE_CHATTER` lines.

  Redirecting the descriptor, not `sys.stderr`, is what reaches C++ logging. Nothing else is
  lost: an import error still propagates and its traceback prints after the restore.
  """
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = drop_native_chatter(capture.read().decode(errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


# ------------------------------------------------------------------------------------------
# Lines.
# ------------------------------------------------------------------------------------------


def is_chief() -> bool:
  """Whether this process prints: process 0 (or any process before JAX is imported)."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def line(text: str, stream=None) -> None:
  """Prints one line on process 0, above any progress bar (tqdm.write redraws the bar)."""
  if is_chief():
    stream = stream or sys.stdout
    tqdm.tqdm.write(text, file=stream)
    stream.flush()


def error(text: str) -> None:
  """Prints an error line to stderr (every process: each may fail on its own), after closing
  any progress bar so that the message starts on a line of its own."""
  for progress in list(_open_progress):
    progress.close()
  sys.stderr.write(text.rstrip("\n") + "\n")
  sys.stderr.flush()


def stream_is_terminal(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty())


def format_count(n: int) -> str:
  """1234 -> '1.23K', 256304 -> '256K', 1234567 -> '1.23M' (3 significant digits)."""
  for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= divisor:
      return f"{n / divisor:.3g}{suffix}"
  return str(n)


def format_duration(seconds: float) -> str:
  """65 -> '1m05s', 3725 -> '1h02m05s', 4.2 -> '4.2s'."""
  if seconds < 10:
    return f"{seconds:.1f}s"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _num(value: float | None, digits: int) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def header_line(mode: str, preset: str, dataset: str, num_steps: int, num_devices: int,
                platform: str, num_processes: int, workdir: str) -> str:
  """`train classmix_reco on synthetic: 800 steps, 1 cpu device, workdir runs/demo`."""
  devices = f"{num_devices} {platform} device{'s' if num_devices != 1 else ''}"
  if num_processes > 1:
    devices += f" in {num_processes} processes"
  what = f"{num_steps} steps, " if mode == "train" else ""
  return f"{mode} {preset} on {dataset}: {what}{devices}, workdir {workdir}"


def parameters_line(count: int, table_path: str | None) -> str:
  """`parameters: 256K (table: runs/demo/parameters.txt)`."""
  where = f" (table: {table_path})" if table_path else ""
  return f"parameters: {format_count(count)}{where}"


def eval_line(step: int, total: int, miou: float, best: float, pixel_accuracy: float) -> str:
  """`step 400/800  mIoU 0.270  best 0.270  pixel acc 0.84`."""
  return (f"step {step}/{total}  mIoU {miou:.3f}  best {best:.3f}  "
          f"pixel acc {pixel_accuracy:.2f}")


def progress_line(step: int, total: int, loss: float | None, miou: float | None,
                  steps_per_second: float | None) -> str:
  """A plain progress line: `step 50/800  loss 1.234  mIoU 0.270  3.2 steps/s  ETA 3m54s`."""
  parts = [f"step {step}/{total}", f"loss {_num(loss, 3)}"]
  if miou is not None:
    parts.append(f"mIoU {miou:.3f}")
  if steps_per_second:
    parts.append(f"{steps_per_second:.2f} steps/s")
    if step < total:
      parts.append(f"ETA {format_duration((total - step) / steps_per_second)}")
  return "  ".join(parts)


def progress_interval(total: int, log_every_steps: int,
                      max_lines: int = MAX_PLAIN_PROGRESS_LINES) -> int:
  """Steps between plain progress lines: every `log_every_steps`, but at most `max_lines`."""
  return max(1, int(log_every_steps), math.ceil(total / max_lines))


# ------------------------------------------------------------------------------------------
# The training progress.
# ------------------------------------------------------------------------------------------


class TrainProgress:
  """One training run's console: a tqdm bar on a terminal, plain lines otherwise.

  `step` after every step, `evaluation` after every evaluation, `close` at the end. Only
  process 0 shows anything (`enabled` defaults to `is_chief()`).

  The first step of a run compiles the program (seconds to minutes), so it gets a line of its
  own with its time, and the bar's steps/s and ETA count from the end of it; evaluations are
  left out of the speed as well.
  """

  def __init__(self, total: int, initial: int = 0, log_every_steps: int = 50, *,
               enabled: bool | None = None, stream=None, interactive: bool | None = None):
    self.total = int(total)
    self.enabled = is_chief() if enabled is None else enabled
    self.stream = stream or sys.stdout
    self.interactive = stream_is_terminal(self.stream) if interactive is None else interactive
    self.interval = progress_interval(self.total, log_every_steps)
    self.loss: float | None = None
    self.miou: float | None = None
    self._first_step = int(initial) + 1
    self._mark = (int(initial), time.monotonic())  # (step, time) of the last plain line
    self._bar = None
    if not self.enabled:
      return
    if initial >= self.total:
      self.write(f"already trained to step {initial}/{self.total}")
      return
    if initial:
      self.write(f"resuming at step {initial}/{self.total}")
    if self.interactive:
      # Shown while the first step compiles; replaced by the timed bar after it.
      self._bar = self._new_bar(initial, "train (compiling)", leave=False)
      _open_progress.add(self)

  def _new_bar(self, initial: int, desc: str, leave: bool = True) -> tqdm.tqdm:
    return tqdm.tqdm(total=self.total, initial=initial, desc=desc, unit="step", file=self.stream,
                     dynamic_ncols=True, mininterval=0.5, leave=leave)

  def write(self, text: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(text, file=self.stream)
      self.stream.flush()

  def _postfix(self) -> str:
    parts = [f"loss {_num(self.loss, 3)}"]
    if self.miou is not None:
      parts.append(f"mIoU {self.miou:.3f}")
    return ", ".join(parts)

  def step(self, step: int, loss: float) -> None:
    """Records that `step` (1-based) is done with `loss`."""
    self.loss = float(loss)
    if not self.enabled:
      return
    now = time.monotonic()
    if step == self._first_step:
      took = now - self._mark[1]
      self._mark = (step, now)
      self.write(f"{progress_line(step, self.total, self.loss, self.miou, None)}  "
                 f"(first step, with compilation: {format_duration(took)})")
      if self._bar is not None:
        self._bar.close()
        self._bar = self._new_bar(step, "train")
        self._bar.set_postfix_str(self._postfix())
      return
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix(), refresh=False)
      self._bar.update(step - self._bar.n)
    elif step % self.interval == 0 or step == self.total:
      last_step, last_time = self._mark
      self._mark = (step, now)
      rate = (step - last_step) / (now - last_time) if now > last_time else None
      self.write(progress_line(step, self.total, self.loss, self.miou, rate))

  def evaluation(self, step: int, miou: float, best: float, pixel_accuracy: float) -> None:
    """Prints the evaluation line and shows `miou` in the bar from now on."""
    self.miou = float(miou)
    self.write(eval_line(step, self.total, miou, best, pixel_accuracy))
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix())
      self._bar.unpause()  # the evaluation's time is not training speed
    self._mark = (step, time.monotonic())

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    _open_progress.discard(self)


# ------------------------------------------------------------------------------------------
# The closing summary.
# ------------------------------------------------------------------------------------------


def latest_step_dir(root: str) -> str | None:
  """The numbered sub-directory of `root` with the highest step (an orbax checkpoint), if any."""
  try:
    steps = [int(name) for name in os.listdir(root) if name.isdigit()]
  except OSError:
    return None
  return os.path.join(root, str(max(steps))) if steps else None


def summary_lines(mode: str, results: Mapping, wall_seconds: float, *, workdir: str,
                  metrics_path: str, checkpoint_dir: str | None, best_dir: str | None,
                  eval_json: str | None = None) -> list[str]:
  """The closing lines: what the run reached, how long it took, and where everything is."""
  took = format_duration(wall_seconds)
  if not results:
    head = (f"done in {took}: no training steps left (the run in {workdir} had finished); "
            f"evaluate it with --mode=eval")
  elif mode == "eval":
    head = (f"evaluated step {results.get('step', '?')} in {took}: mIoU {results['miou']:.3f}"
            f"  pixel acc {results['pixel_accuracy']:.2f}")
  else:
    best = results.get("best_miou")
    best_text = f"  best {best:.3f}" if best is not None else ""
    head = (f"done in {took}: final mIoU {results['miou']:.3f}{best_text}"
            f"  pixel acc {results['pixel_accuracy']:.2f}")
  rows = [("eval JSON", eval_json), ("metrics", metrics_path),
          ("TensorBoard", f"tensorboard --logdir {workdir}"),
          ("best weights", best_dir), ("checkpoints", checkpoint_dir)]
  width = max(len(name) for name, _ in rows)
  return [head] + [f"  {name:<{width}}  {value}" for name, value in rows if value]


# ------------------------------------------------------------------------------------------
# --list
# ------------------------------------------------------------------------------------------


def first_line(doc: str | None) -> str:
  """The first line of a docstring, without Markdown back-quotes."""
  return (doc or "").strip().split("\n", 1)[0].replace("`", "").strip()


def preset_description(preset: Mapping) -> str:
  """A METHOD_PRESETS entry in words: `mean_teacher + classmix + reco`."""
  parts = [preset["method"]]
  if preset.get("mix"):
    parts.append(preset["mix"])
  parts.extend(preset.get("aux_losses", ()))
  return " + ".join(parts)


def _table(rows: Iterable[Sequence[str]], indent: str = "  ") -> list[str]:
  """Rows of cells as aligned columns (the last column is not padded)."""
  rows = [tuple(row) for row in rows]
  if not rows:
    return []
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
  return [(indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip()
          for row in rows]


def listing_lines(datasets: Mapping[str, str], methods: Mapping[str, str],
                  aux_losses: Sequence[str], presets: Mapping[str, str],
                  config_files: Mapping[str, tuple[Sequence[str], str]]) -> list[str]:
  """The `--list` text: datasets, methods, auxiliary losses, presets, config files/variants."""
  lines = ["datasets (--config.input.dataset=NAME):"]
  lines += _table(datasets.items())
  lines += ["methods (reco_jax/methods/; chosen through a preset):"]
  lines += _table(methods.items())
  lines += [f"auxiliary losses (config.aux_losses): {', '.join(aux_losses)}"]
  lines += ["method presets (--config=configs/<file>.py:method=PRESET):"]
  lines += _table(presets.items())
  lines += ["config files and their variants (--config=configs/<file>.py:variant=VARIANT):"]
  lines += _table((path, ", ".join(variants), doc) for path, (variants, doc) in config_files.items())
  return lines


def collect_listing(configs_dir: str) -> list[str]:
  """`listing_lines` of what this checkout has: the dataset registry, the method modules,
  the presets and variants of configs/ (imported here: they are the entry point's, and the
  method registry loads JAX and TensorFlow)."""
  from configs import common
  from input_pipeline import builders, datasets
  from reco_jax import methods
  from reco_jax.methods import auxiliary

  def dataset_doc(name: str) -> str:
    if name == datasets.SYNTHETIC:
      return first_line(importlib.import_module("input_pipeline.synthetic").__doc__)
    cls = builders.get_builder_class(name)
    return first_line(cls.__doc__) or first_line(sys.modules[cls.__module__].__doc__)

  dataset_docs = {name: dataset_doc(name) for name in (datasets.SYNTHETIC, *builders.names())}
  method_docs = {name: first_line(importlib.import_module(methods.module_name(name)).__doc__)
                 for name in methods.known_methods()}
  presets = {name: preset_description(p) for name, p in common.METHOD_PRESETS.items()}
  config_files = {}
  for filename in sorted(os.listdir(configs_dir)):
    name, ext = os.path.splitext(filename)
    if ext != ".py" or name in ("common", "__init__"):
      continue
    module = importlib.import_module(f"configs.{name}")
    config_files[f"configs/{filename}"] = (tuple(getattr(module, "VARIANTS", common.VARIANTS)),
                                           first_line(module.__doc__))
  return listing_lines(dataset_docs, method_docs, tuple(auxiliary.TERMS), presets, config_files)
