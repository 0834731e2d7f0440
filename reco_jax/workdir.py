"""One workdir, one run, one config: the exclusive lock, the config check and the log repair.

* `WorkdirLock`: an exclusive `fcntl.flock` on `<workdir>/.lock.<process index>`. The kernel
  drops a flock when its process dies, so a lock left by a killed run never blocks the next
  one (no stale-lock heuristics needed). flock is per host and works on local file systems;
  on NFS it depends on the server (lockd).
* `check_config`: compares the given config with the one stored with the workdir's latest
  checkpoint. Fields that change the model, the method or the data stop the run with one
  line naming them; harmless ones (logging/eval/checkpoint frequency, paths, the eval
  protocol, a longer run) are allowed and logged. `allow_changes` overrides the check.
* `truncate_metrics`: a resumed run replays the steps after its checkpoint; their
  `metrics.jsonl` lines are removed first, so the file keeps one object per logged step.
"""
import errno
import fcntl
import json
import os
from typing import Any

import ml_collections
from absl import logging

from reco_jax.errors import ConfigError, WorkdirError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"  # the run's config, written by the trainer at its start
# A field one of the two compared configs does not have.
ABSENT = "<absent>"

# Fields whose change cannot make a checkpoint mean something else (prefix match on the
# dotted name). Everything else must match the stored config.
HARMLESS_FIELDS = (
    "num_train_steps",  # a longer run (a shorter one than the checkpoint is an error)
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "keep_best_checkpoint", "num_eval_images_to_log",
    # Runs after the last step and writes only the best checkpoint: the resume checkpoints
    # mean the same with any value. (reload_best_patience_steps changes the trajectory.)
    "bn_reestimation_steps",
    "eval_absent_classes", "eval.",  # the evaluation protocol
    "diagnostics.",  # metrics only: never read by a loss (tests/test_pseudo_diagnostics.py)
    "input.data_dir", "input.manual_dir",  # where the same data lives
    "input.num_threads", "input.prefetch",
    "input.eval_split", "input.eval_size", "input.eval_batch_size",
    # Only seeds step 0 and is never read on resume (the checkpoint holds the weights): a
    # moved weight file must not stop a resume.
    "model.pretrained",
)


class WorkdirLock:
  """Exclusive lock of a workdir for this process; a second run in it stops with one line.

  Use as a context manager; the lock is released on exit (and by the kernel if the process
  dies).
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(workdir, f".lock.{process_index}")
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
        raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                           f"(pid {holder}, lock {self.path}); wait for it or use another "
                           f"--workdir") from None
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as JSON stores them)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use (crop sizes, scales, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`) over today's defaults
  (`configs/common.py: base_config`, so fields added since the run keep the behaviour it had),
  for the tools that take only a workdir (reco_jax/tools). One-line errors when the file is
  missing or broken."""
  from configs import common  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file (is {workdir} a training workdir?)") from None
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path}: not valid JSON ({e})") from None
  config = common.base_config().to_dict()
  _overlay(config, _tuples(stored))
  return ml_collections.ConfigDict(config)


def _overlay(base: dict, stored: dict) -> None:
  """`stored`'s values over `base`, section by section (in place)."""
  for key, value in stored.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      _overlay(base[key], value)
    else:
      base[key] = value


def _harmless(name: str) -> bool:
  return any(name == f or (f.endswith(".") and name.startswith(f)) for f in HARMLESS_FIELDS)


def unread_sections(stored: dict, given: dict) -> set[str]:
  """Config sections neither run reads: those of the other method modules (`config.cac` for a
  PC²Seg run) and of auxiliary terms neither config lists. A new method's section, or a changed
  default of a method the run does not use, must not stop a resume."""
  from reco_jax import methods  # pylint: disable=import-outside-toplevel
  from reco_jax.methods import auxiliary  # pylint: disable=import-outside-toplevel
  used = {stored.get("method"), given.get("method")}
  used |= set(stored.get("aux_losses") or ()) | set(given.get("aux_losses") or ())
  return (set(methods.known_methods()) | set(auxiliary.TERMS)) - used


def _defaults() -> dict:
  """Every field's default (configs/common.py: base_config), flattened."""
  from configs import common  # pylint: disable=import-outside-toplevel
  return flatten(common.base_config().to_dict())


def _added_at_default(name: str, change: tuple, defaults: dict) -> bool:
  """A field the checkpoint's config did not have yet, given at its default: new features
  default to the behaviour that came before them, so an older workdir resumes."""
  old, new = change
  return old == ABSENT and name in defaults and defaults[name] == new


def config_differences(stored: dict, given: dict) -> tuple[dict, dict]:
  """(harmful, harmless) differences {dotted name: (stored, given)} of two config dicts.

  Differences in the sections of methods and auxiliary terms that neither config uses
  (`unread_sections`), and fields the stored config lacks given at their default
  (`_added_at_default`), are harmless."""
  old, new = flatten(stored), flatten(given)
  diffs = {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(old.keys() | new.keys())
           if old.get(k, ABSENT) != new.get(k, ABSENT)}
  unread = unread_sections(stored, given)
  defaults = _defaults()
  harmful = {k: v for k, v in diffs.items()
             if not _harmless(k) and k.split(".", 1)[0] not in unread
             and not _added_at_default(k, v, defaults)}
  return harmful, {k: v for k, v in diffs.items() if k not in harmful}


def check_config(given: dict, stored: dict | None, *, checkpoint_step: int | None,
                 allow_changes: bool = False, what: str = "workdir") -> None:
  """Stops (ConfigError, one line) when `given` differs from the `stored` config in a field
  that changes the model, the method or the data, or asks for fewer steps than the
  checkpoint has; logs harmless differences.

  Args:
    given: the config of this run, `config.to_dict()`.
    stored: the config saved with the checkpoint (None: nothing to compare).
    checkpoint_step: the checkpoint's step (for the `num_train_steps` check), or None.
    allow_changes: `--allow_config_change`: log the differences instead of stopping.
    what: names the checkpoint in the message.
  """
  if stored is None:
    return
  harmful, harmless = config_differences(stored, given)
  for name, (old, new) in harmless.items():
    logging.info("config %s changed from %r (%s) to %r", name, old, what, new)
  if harmful:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(harmful.items())[:6])
    more = f" and {len(harmful) - 6} more" if len(harmful) > 6 else ""
    message = (f"the config differs from the one {what} was trained with in {len(harmful)} "
               f"field(s) that change the model, method or data: {listed}{more}; use another "
               f"--workdir, or pass --allow_config_change to continue anyway")
    if not allow_changes:
      raise ConfigError(message)
    logging.warning("%s (allowed by --allow_config_change)", message)
  steps = given.get("num_train_steps")
  if checkpoint_step is not None and isinstance(steps, int) and steps < checkpoint_step:
    raise ConfigError(f"config num_train_steps={steps} is smaller than the step of {what}'s "
                      f"latest checkpoint ({checkpoint_step}): nothing to train; raise "
                      f"num_train_steps or use --mode=eval")


def truncate_metrics(workdir: str, last_step: int) -> int:
  """Drops the `metrics.jsonl` lines of steps after `last_step` (a resume replays them).

  Returns the number of lines dropped. A torn last line (a kill mid-write) is dropped too.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("step", 0) <= last_step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)  # atomic: a kill here leaves the old or the new file
  return len(lines) - len(kept)
