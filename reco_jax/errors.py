"""The project's error types: what `main.py` prints as one line (exit code 1).

They subclass the built-in types callers already catch (ValueError, FloatingPointError), so
`except ValueError` keeps working. `main.py` also prints any ValueError or FileNotFoundError
as one line: the project raises those with one-line messages naming the file, key or value
at fault. `--verbose_errors` (or RECO_JAX_VERBOSE_ERRORS=1) shows the traceback.
"""


class RecoError(Exception):
  """Base of the project's own errors."""


# What the command-line entry points (main.py, reco_jax/tools/*) print as one line instead of
# a traceback: the project raises these with messages naming the file, key or value at fault.
ONE_LINE_ERRORS = (RecoError, ValueError, FileNotFoundError)


def one_line(error: BaseException) -> str:
  """`error`'s message on one line (whitespace runs collapsed), or its type's name if empty."""
  return " ".join(str(error).split()) or type(error).__name__


class ConfigError(RecoError, ValueError):
  """A config value that cannot work, or one that contradicts the workdir."""


class WeightImportError(ConfigError):
  """A pretrained weight file that cannot become our backbone: unreadable, not a torchvision
  ResNet (a missing, unexpected or mis-shaped key, named), or another architecture than the
  configured backbone."""


class WorkdirError(RecoError):
  """The workdir cannot be used (in use by another run)."""


class NonFiniteLossError(RecoError, FloatingPointError):
  """The loss became NaN or infinite; training stopped."""


class TrainingInterrupted(RecoError):
  """SIGTERM (a scheduler, TPU maintenance): the current step was saved and training stopped."""

  exit_code = 143  # 128 + SIGTERM, what a shell reports for a job stopped by SIGTERM
