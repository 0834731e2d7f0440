"""What each training method (config.method) consists of.

One table so the trainer, the evaluator and the configs agree on whether a method has a
teacher, which mixing it uses and whether the ReCo loss is on.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  uses_teacher: bool  # mean teacher + unlabelled stream
  mix_mode: str  # none | cutout | cutmix | classmix
  uses_reco: bool


METHODS = {
    "supervised": Method("supervised", False, "none", False),
    "supervised_reco": Method("supervised_reco", False, "none", True),
    # Mean teacher with one of the official mixing modes (train_semisup.py --apply_aug).
    "cutout": Method("cutout", True, "cutout", False),
    "cutmix": Method("cutmix", True, "cutmix", False),
    "classmix": Method("classmix", True, "classmix", False),
    # ... plus ReCo on labelled + confidently pseudo-labelled pixels (--apply_reco).
    "cutout_reco": Method("cutout_reco", True, "cutout", True),
    "cutmix_reco": Method("cutmix_reco", True, "cutmix", True),
    "classmix_reco": Method("classmix_reco", True, "classmix", True),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown config method={name!r}; known methods: {', '.join(sorted(METHODS))}")
  return METHODS[name]
