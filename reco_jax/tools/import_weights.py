"""ImageNet-pretrained ResNet weights (torchvision / timm files) -> our backbone's flax trees.

    python -m reco_jax.tools.import_weights --source=torchvision --file=resnet101-63fe2227.pth --out=DIR
    python -m reco_jax.tools.import_weights --source=timm --file=model.safetensors --out=DIR
    python main.py ... --config.model.pretrained=DIR     # or =FILE, converted at start-up

Input: a ResNet state dict with torchvision's names, as `.safetensors` (read with the
`safetensors` package) or `.pth`/`.pt`/`.bin` (needs PyTorch, an optional extra: without it the
error gives the one-line conversion to `.safetensors`). timm's plain-stem ResNets
(`resnet{18,34,50,101}.tv_in1k`, which are torchvision's weights, and e.g. `.a1_in1k`) use the
same names; `--source` only records where the file came from. The architecture is inferred
from the file, never assumed: Basic or Bottleneck blocks (a `conv3` in the blocks), blocks per
stage (`layer{i}.{j}` indices) and base width (the stem's output channels), so reduced-width
models (the w16 goldens) import as well as torchvision's resnet18/34/50/101.

Mapping (flax side under the model's `backbone`; torchvision ResNet v1.5 = our `resnet.ResNet`,
so no stride moves: the dilated output strides 8/16 change the conv geometry, not the weights):

  torchvision                        flax
  conv1.weight  O,I,kh,kw            params      conv1/kernel  kh,kw,I,O
  bn1.weight, bn1.bias               params      bn1/scale, bn1/bias
  bn1.running_mean, .running_var     batch_stats bn1/mean, bn1/var
  layer{i}.{j}.conv{k}, .bn{k}       layer{i}_{j}/conv{k}, bn{k}  (i = 1..4, j from 0)
  layer{i}.{j}.downsample.0, .1      layer{i}_{j}/downsample_conv, downsample_bn
  *.num_batches_tracked, fc.*        dropped (the segmentation heads start from their usual init)

Output DIR (plain files, readable with numpy alone):
  backbone.npz        the two trees flattened to "params/conv1/kernel", "batch_stats/bn1/mean",
                      ... (float32, no pickle; `np.load`).
  architecture.json   {"format": 1, "block", "stage_sizes", "width", "torchvision_name",
                      "backbone" (the matching `config.model.backbone`, or null), "source",
                      "file", "sha256" (of the input file)}.

A file that is not such a state dict fails with one line naming the first bad key (unexpected,
missing or mis-shaped), and a file whose architecture differs from the configured backbone
with one line naming the config field to set.
"""
import argparse
import collections
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from reco_jax import errors
from reco_jax.errors import WeightImportError
from reco_jax.models import resnet

SOURCES = ("torchvision", "timm")
WEIGHTS_FILE = "backbone.npz"
ARCHITECTURE_FILE = "architecture.json"
FORMAT_VERSION = 1
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")

BLOCKS = {"basic": resnet.BasicBlock, "bottleneck": resnet.BottleneckBlock}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_TORCHVISION_NAMES = {
    ("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152"}
# torchvision BatchNorm2d entry -> (flax collection, flax leaf).
_BN_LEAVES = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")
_CONVERT_HINT = ("python -c \"import sys, torch, safetensors.torch as st; "
                 "st.save_file(torch.load(sys.argv[1], map_location='cpu', weights_only=True), "
                 "sys.argv[2])\" FILE.pth FILE.safetensors")

Shapes = Mapping[str, Sequence[int]]
Variables = dict[str, Any]  # {"params": tree, "batch_stats": tree} of the backbone


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A torchvision-style ResNet: block type, blocks per stage, base width (stem channels)."""
  block: str  # "basic" | "bottleneck"
  stage_sizes: tuple[int, ...]
  width: int

  @property
  def torchvision_name(self) -> str | None:
    """torchvision's constructor with these blocks, if any (width aside)."""
    return _TORCHVISION_NAMES.get((self.block, self.stage_sizes))

  @property
  def backbone_name(self) -> str | None:
    """The `config.model.backbone` (`resnet.BACKBONES`) with these blocks and stage sizes."""
    for name, ctor in resnet.BACKBONES.items():
      if (ctor.keywords["block_cls"] is BLOCKS[self.block]
          and tuple(ctor.keywords["stage_sizes"]) == self.stage_sizes):
        return name
    return None

  def describe(self) -> str:
    known = f" (torchvision {self.torchvision_name})" if self.torchvision_name else ""
    return f"{self.block} ResNet {list(self.stage_sizes)} of width {self.width}{known}"

  def build(self, output_stride: int = 16, dtype=np.float32) -> resnet.ResNet:
    """Our `resnet.ResNet` of this architecture (output stride 32 = torchvision's undilated)."""
    return resnet.ResNet(stage_sizes=self.stage_sizes, block_cls=BLOCKS[self.block],
                         width=self.width, output_stride=output_stride, dtype=dtype)


def _ignored(name: str) -> bool:
  """State-dict entries with no counterpart in the backbone: the classifier and BN counters."""
  return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def torch_layout(arch: Architecture) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{torch name: (flax path, torch shape)} of every kept entry, in torchvision's state-dict order.

  The flax path is (collection, module..., leaf), e.g. ("params", "layer1_0", "conv1", "kernel");
  conv shapes are torch's O,I,kh,kw. Downsamples exist where torchvision builds them: on the
  first block of a stage whose stride is 2 or whose channels change.
  """
  layout = {}

  def conv(torch_name, module, out_ch, in_ch, k):
    layout[f"{torch_name}.weight"] = (("params", *module, "kernel"), (out_ch, in_ch, k, k))

  def bn(torch_name, module, channels):
    for suffix, collection, leaf in _BN_LEAVES:
      layout[f"{torch_name}.{suffix}"] = ((collection, *module, leaf), (channels,))

  conv("conv1", ("conv1",), arch.width, 3, 7)
  bn("bn1", ("bn1",), arch.width)
  expansion = _EXPANSION[arch.block]
  inplanes = arch.width
  for i, num_blocks in enumerate(arch.stage_sizes):
    planes = arch.width * 2**i
    for j in range(num_blocks):
      t, f = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
      if arch.block == "basic":
        convs = ((planes, inplanes, 3), (planes, planes, 3))
      else:
        convs = ((planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1))
      for k, (out_ch, in_ch, size) in enumerate(convs, start=1):
        conv(f"{t}.conv{k}", (f, f"conv{k}"), out_ch, in_ch, size)
        bn(f"{t}.bn{k}", (f, f"bn{k}"), out_ch)
      stride = 2 if (i > 0 and j == 0) else 1
      if stride != 1 or inplanes != planes * expansion:
        conv(f"{t}.downsample.0", (f, "downsample_conv"), planes * expansion, inplanes, 1)
        bn(f"{t}.downsample.1", (f, "downsample_bn"), planes * expansion)
      inplanes = planes * expansion
  return layout


def flax_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
  """{"params/conv1/kernel": HWIO shape, ...}: the converted trees, flattened as in backbone.npz."""
  return {"/".join(path): (shape[2], shape[3], shape[1], shape[0]) if path[-1] == "kernel" else shape
          for path, shape in torch_layout(arch).values()}


def infer_architecture(shapes: Shapes, where: str) -> Architecture:
  """The ResNet a torchvision-named state dict describes (from names and shapes only).

  Args:
    shapes: {torch name: shape} of the state dict.
    where: the file, for messages.
  Raises:
    WeightImportError: one line: a deep stem, no stem, no stage, or a block index out of sequence.
  """
  if "conv1.weight" not in shapes:
    if any(k.startswith("conv1.") for k in shapes):
      raise WeightImportError(
          f"{where}: a deep-stem ResNet ('conv1.0.weight', ... : timm resnet*c/d/s, the "
          f"UniMatch/CPS resnet101) is not supported; only torchvision's single 7x7 'conv1'")
    prefixed = next((k for k in shapes if k.endswith("conv1.weight")
                     and not _BLOCK_KEY.search(k)), None)
    hint = (f"; its keys carry a prefix ({prefixed!r}): strip it" if prefixed else
            "; not a torchvision ResNet state dict")
    raise WeightImportError(f"{where}: no key 'conv1.weight'{hint}")
  # The stem's channels by majority over its five entries, so that a single reshaped entry is
  # the one reported (by `check_layout`) instead of every entry that disagrees with it.
  votes = collections.Counter(
      int(shapes[k][0]) for k in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                                  "bn1.running_var") if k in shapes and len(shapes[k]) >= 1)
  width = votes.most_common(1)[0][0]
  block = ("bottleneck" if any(re.fullmatch(r"layer[1-4]\.\d+\.conv3\.weight", k) for k in shapes)
           else "basic")
  stage_sizes = []
  for stage in range(1, 5):
    indices = {}
    for key in shapes:
      m = _BLOCK_KEY.match(key)
      if m and int(m.group(1)) == stage:
        indices.setdefault(int(m.group(2)), key)
    if 0 not in indices:
      raise WeightImportError(f"{where}: no key 'layer{stage}.0.*'; not a torchvision ResNet "
                              f"state dict")
    n = 0
    while n in indices:
      n += 1
    if len(indices) != n:
      stray = min(j for j in indices if j > n)
      raise WeightImportError(f"{where}: key {indices[stray]!r}: block index {stray} of layer{stage} "
                              f"follows block {n - 1} (block {n} is missing)")
    stage_sizes.append(n)
  return Architecture(block, tuple(stage_sizes), width)


def check_layout(shapes: Shapes, arch: Architecture, where: str) -> None:
  """Every entry of `shapes` is a kept or ignored entry of `arch`'s layout with its shape, and
  none is missing; otherwise one line naming the first bad key (in the file's order)."""
  layout = torch_layout(arch)
  for name, shape in shapes.items():
    if _ignored(name):
      continue
    if name not in layout:
      missing = next((k for k in layout if k not in shapes), None)
      hint = f" ({missing!r} is missing: renamed?)" if missing else ""
      raise WeightImportError(f"{where}: unexpected key {name!r} for a {arch.describe()}{hint}")
    if tuple(int(d) for d in shape) != layout[name][1]:
      raise WeightImportError(f"{where}: key {name!r} has shape {tuple(int(d) for d in shape)}; "
                              f"a {arch.describe()} has {layout[name][1]}")
  for name in layout:
    if name not in shapes:
      raise WeightImportError(f"{where}: key {name!r} is missing for a {arch.describe()}")


def convert(state_dict: Mapping[str, np.ndarray], arch: Architecture, where: str) -> Variables:
  """The backbone trees {"params", "batch_stats"} of a state dict checked by `check_layout`.

  Conv kernels go O,I,kh,kw -> kh,kw,I,O; BN entries are copied; everything becomes float32.
  No copy is forced (a transposed view stays a view), so zero-strided stand-in arrays of full
  size cost no memory.
  """
  variables: Variables = {"params": {}, "batch_stats": {}}
  for name, (path, _) in torch_layout(arch).items():
    value = np.asarray(state_dict[name])
    if not np.issubdtype(value.dtype, np.floating):
      raise WeightImportError(f"{where}: key {name!r} has dtype {value.dtype}; expected floats")
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)  # torch OIHW -> flax HWIO
    _set(variables, path, value.astype(np.float32, copy=False))
  return variables


def import_state_dict(state_dict: Mapping[str, np.ndarray], where: str) -> tuple[Architecture, Variables]:
  """Infers the architecture, checks every key and converts: (architecture, backbone trees)."""
  shapes = {k: np.shape(v) for k, v in state_dict.items()}
  arch = infer_architecture(shapes, where)
  check_layout(shapes, arch, where)
  return arch, convert(state_dict, arch, where)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch name: array} of a `.safetensors` or (with PyTorch installed) `.pth` file.

  Raises:
    FileNotFoundError: no such file.
    WeightImportError: an unknown suffix, an unreadable file, or a `.pth` without PyTorch.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained weight file {path} not found")
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    from safetensors import numpy as safetensors_numpy
    try:
      return safetensors_numpy.load_file(path)
    except Exception as e:  # the Rust reader raises its own error type
      raise WeightImportError(f"{path}: not a readable .safetensors file ({e})") from e
  if lower.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise WeightImportError(f"{path}: unknown weight format; expected .safetensors, or "
                          f"{'/'.join(TORCH_SUFFIXES)} with PyTorch installed")


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise WeightImportError(
        f"{path}: reading a .pth file needs PyTorch, an optional extra of reco-jax (pip install "
        f"torch; the CPU build is enough); or convert it once to .safetensors on a machine with "
        f"torch: {_CONVERT_HINT}") from None
  try:
    # weights_only: a plain tensor dict loads without unpickling arbitrary objects.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise WeightImportError(f"{path}: not a readable PyTorch state dict ({e})") from e
  if not isinstance(loaded, Mapping):
    raise WeightImportError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
  out = {}
  for name, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise WeightImportError(f"{path}: key {name!r} holds a {type(value).__name__}, not a tensor "
                              f"(a training checkpoint? save its model's state_dict())")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16
      value = value.float()
    out[name] = value.numpy()
  return out


def import_file(path: str) -> tuple[Architecture, Variables]:
  """(architecture, backbone trees) of a torchvision-named weight file."""
  return import_state_dict(read_state_dict(path), path)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_converted(out_dir: str, arch: Architecture, variables: Variables, *, source: str,
                    file: str) -> None:
  """Writes `backbone.npz` and `architecture.json` to `out_dir` (each via a rename: whole or
  absent)."""
  os.makedirs(out_dir, exist_ok=True)
  flat = {"/".join(path): np.ascontiguousarray(value) for path, value in _flatten(variables)}
  tmp = os.path.join(out_dir, f".{WEIGHTS_FILE}.tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
  meta = {"format": FORMAT_VERSION, "block": arch.block, "stage_sizes": list(arch.stage_sizes),
          "width": arch.width, "torchvision_name": arch.torchvision_name,
          "backbone": arch.backbone_name, "source": source, "file": os.path.basename(file),
          "sha256": _sha256(file)}
  tmp = os.path.join(out_dir, f".{ARCHITECTURE_FILE}.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  os.replace(tmp, os.path.join(out_dir, ARCHITECTURE_FILE))


def read_converted(out_dir: str) -> tuple[Architecture, Variables]:
  """(architecture, backbone trees) of a directory written by `write_converted`; checks that
  `backbone.npz` holds exactly the trees of its architecture (one line naming the first bad key)."""
  meta_path = os.path.join(out_dir, ARCHITECTURE_FILE)
  weights_path = os.path.join(out_dir, WEIGHTS_FILE)
  for p in (meta_path, weights_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{p} not found (write the directory with python -m "
                              f"reco_jax.tools.import_weights)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_VERSION:
    raise WeightImportError(f"{meta_path}: format {meta.get('format')!r}; this version reads "
                            f"format {FORMAT_VERSION} (convert the weight file again)")
  arch = Architecture(meta["block"], tuple(meta["stage_sizes"]), int(meta["width"]))
  expected = flax_shapes(arch)
  with np.load(weights_path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files}
  for key, value in flat.items():
    if key not in expected or value.shape != expected[key]:
      want = f"shape {expected[key]}" if key in expected else "no such entry"
      raise WeightImportError(f"{weights_path}: entry {key!r} has shape {value.shape}; a "
                              f"{arch.describe()} has {want}")
  for key in expected:
    if key not in flat:
      raise WeightImportError(f"{weights_path}: entry {key!r} is missing for a {arch.describe()}")
  variables: Variables = {"params": {}, "batch_stats": {}}
  for key, value in flat.items():
    _set(variables, tuple(key.split("/")), value.astype(np.float32, copy=False))
  return arch, variables


def load_pretrained(path: str) -> tuple[Architecture, Variables]:
  """A directory written by this tool, or a weight file converted on the fly."""
  if os.path.isdir(path):
    return read_converted(path)
  return import_file(path)


def check_matches_config(arch: Architecture, model_config, where: str) -> None:
  """One line naming the config field to change when `arch` is not the configured backbone."""
  name = model_config.backbone
  ctor = resnet.BACKBONES.get(name)
  if ctor is None:
    return  # models.create_model names an unknown backbone
  blocks = {cls: b for b, cls in BLOCKS.items()}[ctor.keywords["block_cls"]]
  stages = tuple(ctor.keywords["stage_sizes"])
  if (blocks, stages) != (arch.block, arch.stage_sizes):
    fix = (f"set --config.model.backbone={arch.backbone_name}" if arch.backbone_name
           else "no backbone of reco_jax/models/resnet.py: BACKBONES has that depth")
    raise WeightImportError(f"config.model.pretrained={where!r} holds a {arch.describe()}, but "
                            f"config.model.backbone={name!r} is a {blocks} ResNet "
                            f"{list(stages)}; {fix}")
  if arch.width != model_config.width:
    raise WeightImportError(f"config.model.pretrained={where!r} holds a {arch.describe()}, but "
                            f"config.model.width={model_config.width}; set "
                            f"--config.model.width={arch.width}")


def load_for_config(model_config) -> Variables | None:
  """The backbone trees of `config.model.pretrained` checked against `config.model`, or None
  when it is unset (the backbone then starts from its random init)."""
  path = model_config.get("pretrained")
  if path is None:
    return None
  arch, variables = load_pretrained(path)
  check_matches_config(arch, model_config, path)
  return variables


def find_backbone(params: Mapping, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
  """The path of the (first, depth-first) submodule named `backbone` in a params tree:
  ("backbone",) for the DeepLab models, ("segmenter", "backbone") inside CAC's wrapper."""
  for key in sorted(params):
    value = params[key]
    if isinstance(value, Mapping):
      if key == "backbone":
        return (*path, key)
      found = find_backbone(value, (*path, key))
      if found is not None:
        return found
  return None


def place_backbone(variables: Mapping, pretrained: Variables, where: str) -> dict:
  """`variables` ({"params", "batch_stats"} of the whole model, arrays or tracers) with the
  backbone's subtrees replaced by `pretrained`; the two must have the same entries and shapes
  (one line naming the first that differs)."""
  path = find_backbone(variables["params"])
  if path is None:
    raise WeightImportError(f"config.model.pretrained={where!r}: the model has no 'backbone' "
                            f"parameters to load it into")
  out = dict(variables)
  for collection in ("params", "batch_stats"):
    target = dict(_flatten(_get(variables[collection], path)))
    given = dict(_flatten(pretrained[collection]))
    for key in sorted(target.keys() | given.keys()):
      name = "/".join((collection, *path, *key))
      if key not in given or key not in target:
        side = "the file" if key not in given else "the model"
        raise WeightImportError(f"config.model.pretrained={where!r}: {name} is not in {side}")
      if tuple(target[key].shape) != tuple(given[key].shape):
        raise WeightImportError(f"config.model.pretrained={where!r}: {name} has shape "
                                f"{tuple(given[key].shape)}; the model has "
                                f"{tuple(target[key].shape)}")
    out[collection] = _replaced(variables[collection], path, pretrained[collection])
  return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
  """Yields (path tuple, leaf) of a nested dict in sorted key order."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      yield from _flatten(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _get(tree: Mapping, path: Sequence[str]) -> Mapping:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _replaced(tree: Mapping, path: Sequence[str], value) -> dict:
  """A copy of `tree` (copied along `path` only) with `tree[path]` = value."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _replaced(tree[path[0]], path[1:], value)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m reco_jax.tools.import_weights",
      description="Convert a torchvision-named ResNet state dict (.safetensors, or .pth with "
                  "PyTorch) into backbone weights for --config.model.pretrained=OUT.")
  parser.add_argument("--source", choices=SOURCES, required=True,
                      help="where the file comes from (both use torchvision's key names)")
  parser.add_argument("--file", required=True, help="the .safetensors or .pth weight file")
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)
  try:
    arch, variables = import_file(args.file)
    write_converted(args.out, arch, variables, source=args.source, file=args.file)
  except errors.ONE_LINE_ERRORS as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return 1
  count = sum(int(np.prod(v.shape)) for _, v in _flatten(variables["params"]))
  backbone = (f"--config.model.backbone={arch.backbone_name} --config.model.width={arch.width}"
              if arch.backbone_name else "no config.model.backbone has this depth")
  print(f"{args.file}: {arch.describe()}, {count:,} backbone parameters (fc dropped)\n"
        f"wrote {os.path.join(args.out, WEIGHTS_FILE)} and "
        f"{os.path.join(args.out, ARCHITECTURE_FILE)}\n"
        f"train with --config.model.pretrained={args.out} ({backbone})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
