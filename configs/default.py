"""Default config: ReCo + ClassMix (preset `classmix_reco`) on the embedded synthetic dataset.

`get_config()` is `configs/synthetic.py`'s default (the recipe is documented there):
`python main.py --workdir=W` trains it end to end in about 4 minutes on a 2-core CPU.
`--config=configs/default.py:smoke` (or `:variant=smoke`) gives a few-step variant for tests
and CI; the argument is otherwise that of configs/synthetic.py, e.g.
`--config=configs/default.py:method=supervised,variant=smoke`.

Every field is declared by `configs/common.py: base_config()`.
"""
import ml_collections

from configs import synthetic


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ReCo + ClassMix on the synthetic dataset, label-scarce (configs/synthetic.py)."""
  if arg and "=" not in arg:  # a bare variant, as `configs/default.py:smoke`
    arg = f"variant={arg}"
  return synthetic.get_config(arg)
