"""ImageNet-weight import (reco_jax/tools/import_weights.py) against torchvision's recorded
outputs (../shared/reference/golden/wave2/README.md §3), and `config.model.pretrained` in
training.

Goldens: torchvision ResNets with random weights under torchvision's own names: Bottleneck and
BasicBlock [1,1,1,1] of base width 16 (`tv_resnet_*_w16.{safetensors,pth}`, stage outputs in
`tv_resnet_w16_outputs.npz`, also at output stride 8), standard-width models whose weights
come from a NumPy recipe (`tv_resnet_std_recipe_outputs.npz`, §3.3), and the full-size
resnet18/34/50/101 name/shape layouts (`tv_resnet_layouts.json`). Arrays are NCHW there.
Tolerance: atol = rtol = 1e-4 at the highest matmul precision (README §3.2, §3.3).
"""
import functools
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import GOLDEN_DIR, REPO_ROOT, golden_recipe_tensor, restore_latest_state, with_overrides
from configs import synthetic
from reco_jax import errors, train
from reco_jax.models import resnet
from reco_jax.tools import import_weights

WAVE2 = GOLDEN_DIR / "wave2"
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
TOL = dict(atol=1e-4, rtol=1e-4)


def _w16_file(block: str, suffix: str = "safetensors") -> str:
  return str(WAVE2 / f"tv_resnet_{block}_1111_w16.{suffix}")


@pytest.fixture(scope="module")
def w16_outputs():
  with np.load(WAVE2 / "tv_resnet_w16_outputs.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _stage_outputs(arch, variables, x_nchw, output_stride):
  """Our backbone's stem and layer1..4 outputs for a torchvision NCHW input, as NCHW numpy."""
  net = arch.build(output_stride)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  with jax.default_matmul_precision("highest"):
    features, sown = jax.jit(functools.partial(net.apply, train=False, mutable=["intermediates"]))(
        variables, x)
  outputs = {"stem": sown["intermediates"]["stem"][0], **features}
  return {k: np.asarray(v).transpose(0, 3, 1, 2) for k, v in outputs.items()}


def _assert_stages(ours, golden, prefix):
  for stage in STAGES:
    np.testing.assert_allclose(ours[stage], golden[f"{prefix}_{stage}"], **TOL,
                               err_msg=f"{prefix}_{stage}")


def _assert_trees_equal(a, b):
  flat_a = dict(import_weights._flatten(a))
  flat_b = dict(import_weights._flatten(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]),
                                  err_msg="/".join(key))


# ---- 1. the w16 goldens (.safetensors, .pth) -----------------------------------------------


@pytest.mark.parametrize("block,output_stride,prefix", [
    ("bottleneck", 32, "bottleneck"), ("bottleneck", 8, "bottleneck_os8"), ("basic", 32, "basic")])
def test_w16_safetensors_reproduce_torchvision_stage_outputs(w16_outputs, block, output_stride,
                                                            prefix):
  arch, variables = import_weights.import_file(_w16_file(block))
  # Inferred from the file, not assumed: base width 16, not 64.
  assert arch == import_weights.Architecture(block, (1, 1, 1, 1), 16)
  ours = _stage_outputs(arch, variables, w16_outputs["x"], output_stride)
  _assert_stages(ours, w16_outputs, prefix)


def test_kept_keys_follow_torchvision_state_dict_order(w16_outputs):
  for block in ("bottleneck", "basic"):
    recorded = [str(k) for k in w16_outputs[f"{block}_state_dict_keys"]]
    layout = import_weights.torch_layout(import_weights.Architecture(block, (1, 1, 1, 1), 16))
    assert list(layout) == [k for k in recorded if not import_weights._ignored(k)]


def test_os8_conv_geometry_is_torchvision_replace_stride_with_dilation(w16_outputs):
  """Our `_nostride_dilate` geometry = torchvision's replace_stride_with_dilation=[F, T, T],
  for the w16 model and for every layer3/layer4 conv of resnet101 (the first block of a
  dilated stage keeps the previous dilation)."""
  with open(WAVE2 / "tv_resnet_layouts.json") as f:
    resnet101 = {name: tuple(v for pair in rows for v in pair) for name, rows in
                 json.load(f)["resnet101_os8_conv_stride_dilation_padding"].items()}
  w16 = {str(name): tuple(int(v) for v in row) for name, row in zip(
      w16_outputs["bottleneck_os8_conv_names"], w16_outputs["bottleneck_os8_conv_stride_dilation_padding"])}
  dilates = resnet._STAGE_DILATES[8]
  for table in (w16, resnet101):
    for name, (sy, sx, dy, dx, py, px) in table.items():
      assert (sy, dy, py) == (sx, dx, px)
      if name == "conv1":
        kernel, stride, dilate = 7, 2, 1
      else:
        layer, block, conv = name.split(".")[:3]
        stage = int(layer[-1]) - 1
        first = stage > 0 and block == "0"
        kernel = 3 if conv == "conv2" else 1 if conv in ("conv1", "conv3", "downsample") else 7
        stride = 2 if first and conv in ("conv2", "downsample") else 1
        dilate = dilates[stage]
      assert resnet.conv_geometry(kernel, stride, dilate) == (sy, dy, py), name


def test_pth_loads_with_torch_or_says_how_to_convert(w16_outputs):
  """Never a skip: with torch the .pth gives the .safetensors trees (and so the goldens);
  without it, one line saying torch is needed and how to convert the file."""
  path = _w16_file("bottleneck", "pth")
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(errors.WeightImportError) as info:
      import_weights.import_file(path)
    message = str(info.value)
    assert "\n" not in message and path in message
    assert "needs PyTorch" in message and "pip install torch" in message
    assert "safetensors.torch" in message and "weights_only=True" in message
    return
  arch, variables = import_weights.import_file(path)
  expected_arch, expected = import_weights.import_file(_w16_file("bottleneck"))
  assert arch == expected_arch
  _assert_trees_equal(variables, expected)
  _assert_stages(_stage_outputs(arch, variables, w16_outputs["x"], 32), w16_outputs, "bottleneck")


def test_pth_reader_uses_a_weights_only_cpu_load(monkeypatch):
  """The torch branch, whether or not torch is installed: a stand-in `torch` module records the
  call and hands back the safetensors' arrays as tensors."""
  arrays = load_file(_w16_file("basic"))
  calls = []

  class Tensor:
    def __init__(self, value):
      self.value, self.dtype = value, value.dtype

    def detach(self):
      return self

    def cpu(self):
      return self

    def numpy(self):
      return self.value

  def fake_load(path, **kwargs):
    calls.append((path, kwargs))
    return {k: Tensor(v) for k, v in arrays.items()}

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(
      load=fake_load, Tensor=Tensor, bfloat16=object()))
  path = _w16_file("basic", "pth")
  arch, variables = import_weights.import_file(path)
  assert calls == [(path, {"map_location": "cpu", "weights_only": True})]
  _assert_trees_equal(variables, import_weights.import_file(_w16_file("basic"))[1])


# ---- 2. standard widths from the NumPy recipe (§3.3) ----------------------------------------


def _recipe_state_dict(keys, shapes) -> dict[str, np.ndarray]:
  """README §3.3: the k-th key's values drawn from RandomState(1000 + k)."""
  state_dict = {}
  for k, (name, shape_text) in enumerate(zip(keys, shapes)):
    name, shape = str(name), tuple(json.loads(str(shape_text)))
    if name.endswith("num_batches_tracked"):
      state_dict[name] = np.asarray(k, np.int64)
      continue
    state_dict[name] = golden_recipe_tensor(k, name, shape)
  return state_dict


@pytest.fixture(scope="module")
def std_recipe():
  with np.load(WAVE2 / "tv_resnet_std_recipe_outputs.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("model,output_stride,prefix,arch", [
    ("bottleneck_1122", 32, "bottleneck_1122", ("bottleneck", (1, 1, 2, 2))),
    ("bottleneck_1122", 8, "bottleneck_1122_os8", ("bottleneck", (1, 1, 2, 2))),
    ("basic_1111", 32, "basic_1111", ("basic", (1, 1, 1, 1)))])
def test_standard_width_recipe_reproduces_torchvision(std_recipe, tmp_path, model, output_stride,
                                                      prefix, arch):
  path = str(tmp_path / f"{model}.safetensors")
  save_file(_recipe_state_dict(std_recipe[f"{model}_state_dict_keys"],
                               std_recipe[f"{model}_state_dict_shapes"]), path)
  imported_arch, variables = import_weights.import_file(path)
  assert imported_arch == import_weights.Architecture(*arch, 64)
  ours = _stage_outputs(imported_arch, variables, std_recipe["x"], output_stride)
  _assert_stages(ours, std_recipe, prefix)


# ---- 3. full-size layouts: every key maps, without materialising the weights ----------------


@pytest.mark.parametrize("name,block,stage_sizes", [
    ("resnet18", "basic", (2, 2, 2, 2)), ("resnet34", "basic", (3, 4, 6, 3)),
    ("resnet50", "bottleneck", (3, 4, 6, 3)), ("resnet101", "bottleneck", (3, 4, 23, 3))])
def test_full_size_torchvision_layouts_map_every_key(name, block, stage_sizes):
  with open(WAVE2 / "tv_resnet_layouts.json") as f:
    entries = json.load(f)[name]
  # Zero-strided stand-ins: full shapes, no memory (resnet101 would be ~170 MB).
  state_dict = {key: np.broadcast_to(np.zeros((), np.dtype(dtype)), shape)
                for key, shape, dtype in entries}
  arch, variables = import_weights.import_state_dict(state_dict, name)
  assert arch == import_weights.Architecture(block, stage_sizes, 64)
  assert arch.torchvision_name == name
  assert arch.backbone_name == name
  kept = [key for key, _, _ in entries if not import_weights._ignored(key)]
  assert list(import_weights.torch_layout(arch)) == kept
  assert {key for key, _, _ in entries} - set(kept) == (
      {"fc.weight", "fc.bias"} | {k for k, _, _ in entries if k.endswith("num_batches_tracked")})
  # The converted trees have exactly our backbone's entries and shapes.
  net = arch.build()
  ours = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  for collection in ("params", "batch_stats"):
    shapes = {k: v.shape for k, v in import_weights._flatten(variables[collection])}
    assert shapes == {k: v.shape for k, v in import_weights._flatten(ours[collection])}


# ---- 4. bad files fail with one line naming the key -----------------------------------------


@pytest.fixture(scope="module")
def bottleneck_w16():
  return load_file(_w16_file("bottleneck"))


def _renamed(sd, old, new):
  sd = dict(sd)
  sd[new] = sd.pop(old)
  return sd


def _reshaped(sd, key):
  sd = dict(sd)
  sd[key] = sd[key][:-1]
  return sd


def _deleted(sd, key):
  sd = dict(sd)
  del sd[key]
  return sd


@pytest.mark.parametrize("corrupt,expected", [
    (lambda sd: _renamed(sd, "layer1.0.conv1.weight", "layer1.0.convX.weight"),
     "unexpected key 'layer1.0.convX.weight' for a bottleneck ResNet [1, 1, 1, 1] of width 16 "
     "('layer1.0.conv1.weight' is missing: renamed?)"),
    (lambda sd: _reshaped(sd, "layer2.0.conv2.weight"),
     "key 'layer2.0.conv2.weight' has shape (31, 32, 3, 3); a bottleneck ResNet [1, 1, 1, 1] of "
     "width 16 has (32, 32, 3, 3)"),
    # The stem's width is voted over its five entries: the reshaped one is the one named.
    (lambda sd: _reshaped(sd, "conv1.weight"), "key 'conv1.weight' has shape (15, 3, 7, 7)"),
    (lambda sd: _reshaped(sd, "layer4.0.bn3.running_var"),
     "key 'layer4.0.bn3.running_var' has shape (511,)"),
    (lambda sd: _deleted(sd, "layer3.0.downsample.1.running_mean"),
     "key 'layer3.0.downsample.1.running_mean' is missing"),
    (lambda sd: _renamed(sd, "conv1.weight", "conv1.0.weight"), "a deep-stem ResNet"),
    (lambda sd: {f"module.{k}": v for k, v in sd.items()},
     "no key 'conv1.weight'; its keys carry a prefix ('module.conv1.weight')"),
    (lambda sd: {k.replace("layer2.0.", "layer2.1."): v for k, v in sd.items()},
     "no key 'layer2.0.*'"),
    (lambda sd: {**sd, "layer3.2.conv1.weight": sd["layer3.0.conv1.weight"]},
     "key 'layer3.2.conv1.weight': block index 2 of layer3 follows block 0 (block 1 is missing)"),
])
def test_a_bad_key_fails_with_one_line_naming_it(bottleneck_w16, corrupt, expected):
  with pytest.raises(errors.WeightImportError) as info:
    import_weights.import_state_dict(corrupt(bottleneck_w16), "f.safetensors")
  message = str(info.value)
  assert message.startswith("f.safetensors: ") and expected in message and "\n" not in message
  assert isinstance(info.value, errors.ConfigError)  # main.py prints it as one line


def test_cli_reports_a_reshaped_key_in_one_line(bottleneck_w16, tmp_path, capsys):
  path = str(tmp_path / "bad.safetensors")
  save_file(_reshaped(bottleneck_w16, "layer3.0.conv3.weight"), path)
  code = import_weights.main(["--source=torchvision", f"--file={path}", f"--out={tmp_path / 'o'}"])
  err = capsys.readouterr().err
  assert code == 1 and err.count("\n") == 1
  assert err.startswith(f"error: {path}: key 'layer3.0.conv3.weight' has shape (255, 64, 1, 1)")
  assert not (tmp_path / "o").exists()


# ---- 5. the tool's directory and config.model.pretrained ------------------------------------


def _model_config(**overrides):
  config = synthetic.get_config("method=classmix,variant=smoke")
  return with_overrides(config, {"model.width": 16, **overrides})


def test_cli_writes_a_directory_that_loads_back(tmp_path, capsys):
  out = tmp_path / "pretrained"
  source = _w16_file("bottleneck")
  assert import_weights.main(["--source=timm", f"--file={source}", f"--out={out}"]) == 0
  assert f"--config.model.pretrained={out}" in capsys.readouterr().out
  meta = json.loads((out / "architecture.json").read_text())
  assert meta == {"format": 1, "block": "bottleneck", "stage_sizes": [1, 1, 1, 1], "width": 16,
                  "torchvision_name": None, "backbone": "resnet_tiny", "source": "timm",
                  "file": "tv_resnet_bottleneck_1111_w16.safetensors",
                  "sha256": import_weights._sha256(source)}
  arch, variables = import_weights.load_pretrained(str(out))
  expected_arch, expected = import_weights.load_pretrained(source)
  assert arch == expected_arch
  _assert_trees_equal(variables, expected)
  # The directory and the file itself are both valid config.model.pretrained values.
  for path in (str(out), source):
    _assert_trees_equal(import_weights.load_for_config(_model_config(**{"model.pretrained": path}).model),
                        expected)
  assert import_weights.load_for_config(_model_config().model) is None


def test_a_tampered_directory_names_the_entry(tmp_path):
  out = tmp_path / "pretrained"
  assert import_weights.main(["--source=torchvision", f"--file={_w16_file('basic')}",
                              f"--out={out}"]) == 0
  with np.load(out / "backbone.npz") as data:
    flat = {k: data[k] for k in data.files}
  del flat["batch_stats/layer2_0/bn1/var"]
  np.savez(out / "backbone.npz", **flat)
  with pytest.raises(errors.WeightImportError, match=r"entry 'batch_stats/layer2_0/bn1/var' is missing"):
    import_weights.load_pretrained(str(out))


@pytest.mark.parametrize("overrides,expected", [
    ({"model.backbone": "resnet18"},
     "config.model.backbone='resnet18' is a basic ResNet [2, 2, 2, 2]; set "
     "--config.model.backbone=resnet_tiny"),
    ({"model.width": 8}, "config.model.width=8; set --config.model.width=16"),
])
def test_an_architecture_other_than_the_configured_backbone_fails_naming_the_field(overrides,
                                                                                   expected):
  config = _model_config(**{"model.pretrained": _w16_file("bottleneck"), **overrides})
  with pytest.raises(errors.WeightImportError) as info:
    import_weights.load_for_config(config.model)
  assert expected in str(info.value) and "bottleneck ResNet [1, 1, 1, 1] of width 16" in str(info.value)


def test_place_backbone_replaces_only_the_backbone():
  """The heads keep their random init; CAC's wrapper nests the backbone one level deeper."""
  pretrained = {"params": {"conv1": {"kernel": np.ones((7, 7, 3, 4), np.float32)}},
                "batch_stats": {"bn1": {"mean": np.ones((4,), np.float32)}}}
  head = {"out": {"kernel": np.zeros((1, 1, 4, 2), np.float32)}}
  variables = {"params": {"segmenter": {"backbone": {"conv1": {"kernel": np.zeros((7, 7, 3, 4))}},
                                        "head": head}, "classifier": head},
               "batch_stats": {"segmenter": {"backbone": {"bn1": {"mean": np.zeros((4,))}}}}}
  placed = import_weights.place_backbone(variables, pretrained, "f")
  assert placed["params"]["segmenter"]["backbone"] is pretrained["params"]
  assert placed["batch_stats"]["segmenter"]["backbone"] is pretrained["batch_stats"]
  assert placed["params"]["segmenter"]["head"] is head and placed["params"]["classifier"] is head
  assert variables["params"]["segmenter"]["backbone"]["conv1"]["kernel"].sum() == 0  # not mutated
  wrong = {"params": {"conv1": {"kernel": np.ones((7, 7, 3, 5), np.float32)}},
           "batch_stats": pretrained["batch_stats"]}
  with pytest.raises(errors.WeightImportError, match=r"params/segmenter/backbone/conv1/kernel has "
                                                     r"shape \(7, 7, 3, 5\); the model has \(7, 7, 3, 4\)"):
    import_weights.place_backbone(variables, wrong, "f")


def test_create_state_puts_the_weights_in_student_and_teacher(single_device_mesh):
  """Mean teacher: the teacher copy is made from the pretrained student."""
  config = _model_config(**{"model.pretrained": _w16_file("bottleneck")})
  _, method = train.build(config)
  pretrained = import_weights.load_for_config(config.model)
  state = jax.device_get(train.create_state(config, method, single_device_mesh, pretrained))
  for variables in ({"params": state.params, "batch_stats": state.batch_stats}, state.extra):
    _assert_trees_equal({c: variables[c]["backbone"] for c in ("params", "batch_stats")}, pretrained)


class _CreateStateCalled(Exception):
  pass


@pytest.mark.parametrize("latest", [None, 4])
def test_the_trainer_reads_the_weights_for_a_fresh_run_only(tmp_path, monkeypatch, latest):
  """Up to state creation (nothing compiles): a fresh workdir hands the file's trees to
  `create_state`; with a checkpoint (latest step 4) the file, here absent, is never read."""
  path = _w16_file("bottleneck") if latest is None else str(tmp_path / "gone.safetensors")
  config = with_overrides(synthetic.get_config("method=supervised,variant=smoke"),
                          {"model.width": 16, "model.pretrained": path})
  real_manager = train.checkpointing.create_resume_manager

  def manager_with_checkpoint(*args, **kwargs):
    manager = real_manager(*args, **kwargs)
    monkeypatch.setattr(manager, "latest_step", lambda: latest)
    return manager

  def create_state(config, method, mesh, pretrained=None):
    raise _CreateStateCalled(pretrained)

  monkeypatch.setattr(train.checkpointing, "create_resume_manager", manager_with_checkpoint)
  monkeypatch.setattr(train, "create_state", create_state)
  with pytest.raises(_CreateStateCalled) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  given = info.value.args[0]
  if latest is None:
    _assert_trees_equal(given, import_weights.import_file(path)[1])
  else:
    assert given is None


def _main(workdir, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # two main.py runs that compile a DeepLabv3+ train step (1-2 min on 2 cores)
def test_main_trains_from_the_weights_and_a_resume_never_reads_them(tmp_path):
  """`python main.py ... --config.model.pretrained=FILE`: at learning rate 0 the step-1
  checkpoint's backbone parameters are exactly the file's (so training started from them);
  the resumed run, with the file deleted, restores its checkpoint without reading it."""
  weights = tmp_path / "w16.safetensors"
  shutil.copy(_w16_file("bottleneck"), weights)
  _, expected = import_weights.import_file(str(weights))
  workdir = str(tmp_path / "run")
  args = ["--config=configs/synthetic.py:method=supervised,variant=smoke",
          "--config.model.width=16", f"--config.model.pretrained={weights}",
          "--config.optim.lr=0", "--config.optim.min_lr=0", "--config.eval_every_steps=1",
          "--config.checkpoint_every_steps=1"]
  proc = _main(workdir, *args, "--config.num_train_steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = with_overrides(synthetic.get_config("method=supervised,variant=smoke"), {
      "model.width": 16, "model.pretrained": str(weights), "optim.lr": 0.0, "optim.min_lr": 0.0,
      "eval_every_steps": 1, "checkpoint_every_steps": 1, "num_train_steps": 1})
  state = jax.device_get(restore_latest_state(config, workdir))
  assert int(state.step) == 1
  _assert_trees_equal(state.params["backbone"], expected["params"])

  weights.unlink()
  proc = _main(workdir, *args, "--config.num_train_steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f if '"train"' in line] == [1, 2]
