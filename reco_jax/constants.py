"""Constants shared by the input pipeline, the models' callers, the losses and the reports.

Plain Python with no imports, so that the TF input pipeline can use it without pulling in JAX.

* Labels: stored datasets (uint8 PNGs, TFDS) mark void pixels with `STORED_VOID`; the input
  pipeline maps them to `IGNORE_LABEL`, the value every on-device `i32` label map uses for
  void/unlabelled pixels (as the official code after loading).
* Images: on device they are ImageNet-normalised, `(pixel / UINT8_MAX - IMAGENET_MEAN) /
  IMAGENET_STD` per RGB channel (torchvision's `Normalize` values, as the official
  `build_data.py`); `UINT8_MAX` is also the scale of the official 8-bit PIL round trips.
"""

IGNORE_LABEL = -1
STORED_VOID = 255

UINT8_MAX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
