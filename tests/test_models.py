"""Models: shapes and strides, BatchNorm semantics, dtypes, and the `heads.npz` goldens."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_recipe_tensor

from configs import default
from reco_jax import parallel
from reco_jax.models import create_model
from reco_jax.models import deeplab
from reco_jax.models import resnet

_GOLDEN_TOL = dict(rtol=1e-4, atol=1e-4)


def _tiny_model_config(name: str, output_stride: int | None, dtype: str = "float32"):
  config = default.get_config("smoke").model
  config.name = name
  config.output_stride = output_stride
  config.dtype = dtype
  return config


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
  """PyTorch's conv / pool output size."""
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _torch_layer_sizes(size: int, output_stride: int) -> dict[str, int]:
  """layer1..layer4 spatial sizes of torchvision's ResNet with dilation (PyTorch arithmetic)."""
  stride4 = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)  # conv1, maxpool
  stride8 = _conv_out(stride4, 3, 2, 1)
  stride16 = _conv_out(stride8, 3, 2, 1)
  deep = stride16 if output_stride == 16 else stride8
  return {"layer1": stride4, "layer2": stride8, "layer3": deep, "layer4": deep}


def _torch_sizes(size: int, output_stride: int) -> tuple[int, int]:
  """(layer1, layer4) spatial size of torchvision's ResNet with dilation."""
  sizes = _torch_layer_sizes(size, output_stride)
  return sizes["layer1"], sizes["layer4"]


def _key(seed: int = 0) -> jax.Array:
  # XLA:CPU compiles each threefry draw slowly (~1 s per parameter under load); the
  # RBG generator keeps jitted init cheap. The initialiser *distributions* are unchanged.
  return jax.random.key(seed, impl="rbg")


def _images(batch: int, size: int) -> jax.Array:
  return jnp.asarray(np.random.RandomState(0).standard_normal((batch, size, size, 3)),
                     jnp.float32)


@functools.cache
def _init_and_apply(name: str, output_stride: int):
  """A tiny model initialised and run in train and eval mode on 8 33x33 images, one jit."""
  model = create_model(_tiny_model_config(name, output_stride), num_classes=5)

  def run(key, images):
    variables = model.init(key, images, train=False)
    train = model.apply(variables, images, train=True, mutable=["batch_stats"])
    evaluation = model.apply(variables, images, train=False, mutable=["batch_stats"])
    return variables, train, evaluation

  variables, (train_out, train_updates), (eval_out, eval_updates) = jax.block_until_ready(
      jax.jit(run)(_key(), _images(8, 33)))
  return model, variables, train_out, train_updates, eval_out, eval_updates


# ---- shapes, strides and dilation geometry --------------------------------------------------


@pytest.mark.parametrize("size", [33, 64])
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["deeplabv3plus", "deeplabv2", "deeplabv3"])
def test_output_shapes_follow_pytorch_arithmetic(name, output_stride, size):
  # eval_shape traces the whole model (so every shape must line up) without compiling.
  model = create_model(_tiny_model_config(name, output_stride), num_classes=5)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), _key(), images)
  low, high = _torch_sizes(size, output_stride)
  out = low if name == "deeplabv3plus" else high
  for train in (True, False):
    outputs = jax.eval_shape(
        functools.partial(model.apply, train=train, mutable=["batch_stats"]),
        variables, images)[0]
    logits, rep = outputs["logits"], outputs["rep"]
    assert logits.shape == (2, out, out, 5)
    assert rep.shape == (2, out, out, 16)  # smoke rep_dim
    assert logits.dtype == rep.dtype == jnp.float32


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["deeplabv3plus", "deeplabv2", "deeplabv3"])
def test_features_are_the_backbone_stages_and_the_decoder_map(name, output_stride):
  model = create_model(_tiny_model_config(name, output_stride), num_classes=5)
  images = jax.ShapeDtypeStruct((2, 33, 33, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), _key(), images)
  outputs = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  assert set(outputs) == {"logits", "rep", "features"}
  features = outputs["features"]
  sizes = _torch_layer_sizes(33, output_stride)
  expected = {layer: (2, size, size, 8 * 2**i * 4)  # smoke width 8, bottleneck expansion 4
              for i, (layer, size) in enumerate(sizes.items())}
  if name == "deeplabv3plus":
    # concat(project(layer1), upsampled ASPP): project_dim 8 + head_dim 16 at stride 4.
    expected["decoder"] = (2, sizes["layer1"], sizes["layer1"], 8 + 16)
  if name == "deeplabv3":  # the ASPP output both heads read: head_dim 16 at the output stride
    expected["aspp"] = (2, sizes["layer4"], sizes["layer4"], 16)
  assert {k: v.shape for k, v in features.items()} == expected
  assert {v.dtype for v in features.values()} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name,layer4_size,out_size", [("deeplabv2", 41, 41),
                                                       ("deeplabv3plus", 21, 81),
                                                       ("deeplabv3", 41, 41)])
def test_output_stride_none_is_the_models_official_default(name, layer4_size, out_size):
  # Official: deeplabv2.py always dilates layer3 and layer4 (stride 8: 321 -> 41x41);
  # DeepLabv3+ outputs at stride 4 with its ASPP on layer4 at stride 16.
  model = create_model(_tiny_model_config(name, None), num_classes=5)
  images = jax.ShapeDtypeStruct((1, 321, 321, 3), jnp.float32)
  aspp_rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, deeplab.ASPP):
      aspp_rates.append(tuple(context.module.rates))
    return next_fun(*args, **kwargs)

  variables = jax.eval_shape(functools.partial(model.init, train=False), _key(), images)
  with nn.intercept_methods(record):
    outputs = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  assert outputs["logits"].shape == (1, out_size, out_size, 5)
  assert outputs["rep"].shape == (1, out_size, out_size, 16)
  assert outputs["features"]["layer4"].shape[1:3] == (layer4_size, layer4_size)
  # DeepLabv3+'s ASPP runs at stride 16, DeepLabv3's ("D-ResNet") at 8: the official rates.
  expected_rates = {"deeplabv3plus": {(6, 12, 18)}, "deeplabv3": {(12, 24, 36)}, "deeplabv2": set()}
  assert set(aspp_rates) == expected_rates[name]


@pytest.mark.parametrize("name,output_stride", [("deeplabv2", 16), ("deeplabv3plus", 8)])
def test_explicit_output_stride_overrides_the_default(name, output_stride):
  model = create_model(_tiny_model_config(name, output_stride), num_classes=5)
  assert model.backbone.output_stride == output_stride


@pytest.mark.parametrize("name,output_stride", [("deeplabv3plus", 16), ("deeplabv2", 8),
                                               ("deeplabv3", 8)])
def test_tiny_models_run_and_are_finite(name, output_stride):
  _, _, train_out, _, eval_out, _ = _init_and_apply(name, output_stride)
  logits, rep = train_out["logits"], train_out["rep"]
  eval_logits, eval_rep = eval_out["logits"], eval_out["rep"]
  low, high = _torch_sizes(33, output_stride)
  out = low if name == "deeplabv3plus" else high
  assert logits.shape == eval_logits.shape == (8, out, out, 5)
  assert rep.shape == eval_rep.shape == (8, out, out, 16)
  for x in (logits, rep, eval_logits, eval_rep):
    assert np.isfinite(np.asarray(x)).all() and np.asarray(x).std() > 0


@pytest.mark.parametrize("backbone,size,output_stride", [
    ("resnet101", 321, 16), ("resnet101", 513, 16), ("resnet50", 321, 8),
    ("resnet18", 321, 16), ("resnet18", 65, 8)])
def test_full_size_backbone_shapes(backbone, size, output_stride):
  net = resnet.BACKBONES[backbone](output_stride=output_stride)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(net.init, train=False), _key(), images)
  features = jax.eval_shape(functools.partial(net.apply, train=False), variables, images)
  sizes = _torch_layer_sizes(size, output_stride)
  expansion = 1 if backbone == "resnet18" else 4
  assert {k: v.shape for k, v in features.items()} == {
      layer: (1, sizes[layer], sizes[layer], 64 * 2**i * expansion)
      for i, layer in enumerate(("layer1", "layer2", "layer3", "layer4"))}


def test_resnet101_has_torchvision_parameter_count():
  net = resnet.resnet101()
  variables = jax.eval_shape(functools.partial(net.init, train=False), _key(),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  # torchvision resnet101: 44,549,160 parameters, of which the fc layer has 2048*1000+1000.
  assert count == 44_549_160 - 2_049_000


def test_nostride_dilate_matches_golden_rows(golden):
  rows = golden("heads.npz")["nostride_dilate_rows"]
  original_strides = [2, 2, 1, 1] * 2  # 1x1 s2, 3x3 s2, 3x3 s1, 1x1 s1; for dilate 2 and 4
  for row, stride in zip(rows, original_strides):
    dilate, kernel, new_stride, new_dilation, new_padding = (int(v) for v in row)
    assert resnet.nostride_dilate(dilate, kernel, stride) == (
        new_stride, new_dilation, new_padding), row


def _conv_plan(net: resnet.ResNet) -> dict[str, tuple[int, int, int, int]]:
  """'{block}/{conv}' -> (kernel, stride, dilation, padding) for every Conv2d the net calls."""
  plan = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, resnet.Conv2d) and context.method_name == "__call__":
      plan["/".join(module.path[-2:])] = (module.kernel_size, module.stride, module.dilation,
                                          module.padding)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(net.init, train=False), _key(),
                   jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return plan


@pytest.mark.parametrize("output_stride", [8, 16])
def test_bottleneck_dilation_matches_torchvision_replace_stride_with_dilation(output_stride):
  # torchvision: a dilated stage's first block keeps the previous dilation on its 3x3, the
  # others get the new one; the 1x1 downsample loses its stride.
  net = resnet.ResNet(stage_sizes=(1, 1, 2, 2), block_cls=resnet.BottleneckBlock, width=4,
                      output_stride=output_stride)
  plan = _conv_plan(net)
  if output_stride == 16:
    expected = {"layer3_0/conv2": (3, 2, 1, 1), "layer3_0/downsample_conv": (1, 2, 1, 0),
                "layer3_1/conv2": (3, 1, 1, 1), "layer4_0/conv2": (3, 1, 1, 1),
                "layer4_0/downsample_conv": (1, 1, 1, 0), "layer4_1/conv2": (3, 1, 2, 2)}
  else:
    expected = {"layer3_0/conv2": (3, 1, 1, 1), "layer3_0/downsample_conv": (1, 1, 1, 0),
                "layer3_1/conv2": (3, 1, 2, 2), "layer4_0/conv2": (3, 1, 2, 2),
                "layer4_0/downsample_conv": (1, 1, 1, 0), "layer4_1/conv2": (3, 1, 4, 4)}
  expected |= {"layer2_0/conv2": (3, 2, 1, 1), "layer1_0/downsample_conv": (1, 1, 1, 0),
               "conv1": (7, 2, 1, 3), "layer4_1/conv1": (1, 1, 1, 0),
               "layer4_1/conv3": (1, 1, 1, 0)}
  assert {key: plan.get(key) for key in expected} == expected


def test_basic_block_dilation_follows_nostride_dilate():
  net = resnet.ResNet(stage_sizes=(1, 1, 1, 2), block_cls=resnet.BasicBlock, width=4,
                      output_stride=16)
  plan = _conv_plan(net)
  assert plan["layer4_0/conv1"] == (3, 1, 1, 1)  # had stride 2: dilation dilate/2
  assert plan["layer4_0/conv2"] == (3, 1, 2, 2)
  assert plan["layer4_0/downsample_conv"] == (1, 1, 1, 0)
  assert plan["layer4_1/conv1"] == plan["layer4_1/conv2"] == (3, 1, 2, 2)
  assert plan["layer3_0/conv1"] == (3, 2, 1, 1)
  assert "layer1_0/downsample_conv" not in plan  # 4 -> 4 channels, stride 1: identity


# ---- BatchNorm, parameters and dtypes --------------------------------------------------------


@pytest.mark.parametrize("name,output_stride", [("deeplabv3plus", 16), ("deeplabv2", 8),
                                               ("deeplabv3", 8)])
def test_batch_stats_change_only_in_train_mode(name, output_stride):
  _, variables, _, train_updates, _, eval_updates = _init_and_apply(name, output_stride)
  assert set(variables) == {"params", "batch_stats"}
  stats = variables["batch_stats"]
  assert jax.tree.structure(stats) == jax.tree.structure(train_updates["batch_stats"])
  # Eval mode returns the statistics untouched.
  for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(eval_updates["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
  # Train mode moves every running statistic (all BN layers see non-constant inputs).
  changed = [not np.array_equal(np.asarray(old), np.asarray(new)) for old, new in
             zip(jax.tree.leaves(stats), jax.tree.leaves(train_updates["batch_stats"]))]
  assert all(changed)
  flat = flax.traverse_util.flatten_dict(stats)
  assert {k[-1] for k in flat} == {"mean", "var"}


def test_batchnorm_matches_pytorch_train_and_eval_numerics():
  rs = np.random.RandomState(3)
  x = (3.0 + 2.0 * rs.standard_normal((4, 5, 3, 6))).astype(np.float32)
  bn = resnet.BatchNorm()
  scale = (1 + 0.1 * rs.standard_normal(6)).astype(np.float32)
  bias = (0.1 * rs.standard_normal(6)).astype(np.float32)
  mean0 = (0.1 * rs.standard_normal(6)).astype(np.float32)
  var0 = (0.5 + rs.random_sample(6)).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": mean0, "var": var0}}
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  x64 = x.astype(np.float64).reshape(-1, 6)
  mean, var = x64.mean(0), x64.var(0)
  n = x64.shape[0]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 6),
                             (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)
  # PyTorch momentum 0.1; the running variance takes the *unbiased* batch variance.
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * mean0 + 0.1 * mean,
                             atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 * var0 + 0.1 * var * n / (n - 1), atol=1e-6)
  y_eval = bn.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 6),
                             (x64 - mean0) / np.sqrt(var0 + 1e-5) * scale + bias, atol=1e-5)


def test_batchnorm_statistics_are_global_under_a_sharded_batch(mesh):
  model, variables, train_out, train_updates, _, _ = _init_and_apply("deeplabv3plus", 16)
  step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  sharded = jax.block_until_ready(step(jax.device_put(variables, parallel.replicated(mesh)),
                                       jax.device_put(_images(8, 33),
                                                      parallel.data_sharded(mesh))))
  for a, b in zip(jax.tree.leaves((train_out, train_updates)), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,output_stride", [("deeplabv3plus", 16), ("deeplabv2", 8),
                                               ("deeplabv3", 8)])
def test_bfloat16_mode_computes_in_bf16_with_float32_params_and_outputs(name, output_stride):
  _, variables, outputs32, _, _, _ = _init_and_apply(name, output_stride)
  logits32 = outputs32["logits"]
  model = create_model(_tiny_model_config(name, output_stride, "bfloat16"), num_classes=5)
  images = _images(8, 33)
  # The bf16 model has the same float32 variable tree as the float32 one.
  abstract = jax.eval_shape(functools.partial(model.init, train=False), _key(), images)
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  conv_dtypes = {eqn.invars[0].aval.dtype
                 for eqn in jax.make_jaxpr(apply)(variables, images).eqns
                 if eqn.primitive.name == "conv_general_dilated"}
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
  outputs, updates = jax.jit(apply)(variables, images)
  logits, rep = outputs["logits"], outputs["rep"]
  assert logits.dtype == rep.dtype == jnp.float32
  # Features stay in the compute dtype.
  assert {x.dtype for x in jax.tree.leaves(outputs["features"])} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(rep)).all()
  # Close to the float32 model with the same parameters (bf16 has ~3 significant digits).
  scale = float(np.abs(np.asarray(logits32)).max())
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits32), atol=0.1 * scale)


def test_official_head_widths_and_init():
  config = _tiny_model_config("deeplabv3plus", 16)
  config.head_dim = 256
  model = create_model(config, num_classes=5)
  assert model.project_dim == 48
  # Initialise the head alone on small features: the full tiny model adds nothing here.
  head = deeplab.DeepLabV3PlusHead(num_classes=5, rep_dim=16, head_dim=model.head_dim,
                                   project_dim=model.project_dim)
  x_low, x_high = jnp.ones((1, 9, 9, 32)), jnp.ones((1, 3, 3, 256))
  params = jax.jit(functools.partial(head.init, train=False))(_key(), x_low, x_high)["params"]
  assert params["ASPP"]["project"]["conv"]["kernel"].shape == (1, 1, 5 * 256, 256)
  assert params["classifier"]["conv"]["kernel"].shape == (3, 3, 48 + 256, 256)
  assert params["representation"]["out"]["kernel"].shape == (1, 1, 256, 16)
  # PyTorch default conv init U(±1/sqrt(fan_in)); BN scale 1, bias 0.
  for kernel, fan_in in ((params["classifier"]["conv"]["kernel"], 9 * 304),
                         (params["ASPP"]["convs_1"]["conv"]["kernel"], 9 * 256)):
    bound = 1 / np.sqrt(fan_in)
    kernel = np.asarray(kernel)
    assert bound * 0.99 < np.abs(kernel).max() <= bound
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.02 * bound
  bias = np.asarray(params["classifier"]["out"]["bias"])
  assert np.abs(bias).max() <= 1 / np.sqrt(256)
  np.testing.assert_array_equal(params["classifier"]["bn"]["scale"], np.ones(256))
  np.testing.assert_array_equal(params["classifier"]["bn"]["bias"], np.zeros(256))


@pytest.mark.parametrize("field,value", [
    ("name", "unet"), ("backbone", "resnet152"), ("output_stride", 32), ("output_stride", 4),
    ("dtype", "float16"), ("head_dim", 0)])
def test_create_model_rejects_bad_config_with_the_field_name(field, value):
  config = _tiny_model_config("deeplabv3plus", 16)
  config[field] = value
  with pytest.raises(ValueError, match=rf"config\.model\.{field}={value!r}") as error:
    create_model(config, num_classes=5)
  assert "\n" not in str(error.value)


# ---- heads.npz goldens (golden README §8) -----------------------------------------------------

_ASPP_MODULES = {
    **{f"convs.{i}.0": f"convs_{i}/conv" for i in range(4)},
    **{f"convs.{i}.1": f"convs_{i}/bn" for i in range(4)},
    "convs.4.1": "convs_4/conv", "convs.4.2": "convs_4/bn",  # convs.4.0 is the pooling
    "project.0": "project/conv", "project.1": "project/bn",
}
_DLV3P_MODULES = {
    **{f"ASPP.{k}": f"ASPP/{v}" for k, v in _ASPP_MODULES.items()},
    "project.0": "project/conv", "project.1": "project/bn",
    **{f"{head}.{i}": f"{head}/{part}" for head in ("classifier", "representation")
       for i, part in ((0, "conv"), (1, "bn"), (3, "out"))},
}
_DLV2_MODULES = {
    **{f"classifier.conv2d_list.{i}": f"classifier/conv_{i}" for i in range(4)},
    "representation.0": "representation",
}


def _variables_from_recipe(abstract: dict, names, modules: dict[str, str]) -> dict:
  """Flax variables with the shapes of `abstract`, filled from the PyTorch state recipe.

  Conv weights O x I x kh x kw become HWIO kernels; BN weight/bias/running_mean/running_var
  become params scale/bias and batch_stats mean/var. Every flax leaf must be filled.
  """
  flat_abstract = flax.traverse_util.flatten_dict(abstract, sep="/")
  flat = {}
  for k, torch_name in enumerate(str(n) for n in names):
    module_name, leaf = torch_name.rsplit(".", 1)
    path = modules[module_name]
    is_conv = f"params/{path}/kernel" in flat_abstract
    key = {("weight", True): f"params/{path}/kernel", ("bias", True): f"params/{path}/bias",
           ("weight", False): f"params/{path}/scale", ("bias", False): f"params/{path}/bias",
           ("running_mean", False): f"batch_stats/{path}/mean",
           ("running_var", False): f"batch_stats/{path}/var"}[(leaf, is_conv)]
    shape = flat_abstract[key].shape
    if key.endswith("kernel"):
      kh, kw, cin, cout = shape
      flat[key] = golden_recipe_tensor(k, torch_name, (cout, cin, kh, kw)).transpose(2, 3, 1, 0)
    else:
      flat[key] = golden_recipe_tensor(k, torch_name, shape)
  assert set(flat) == set(flat_abstract), set(flat_abstract) ^ set(flat)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _seeded_input(seed_shape: np.ndarray) -> np.ndarray:
  """NCHW golden input regenerated from [seed, *shape], returned NHWC."""
  seed, *shape = (int(v) for v in seed_shape)
  x = np.random.RandomState(seed).standard_normal(shape).astype(np.float32)
  return x.transpose(0, 2, 3, 1)


def _nchw(x: jax.Array) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def _eval_and_train(module: nn.Module, variables: dict, *inputs):
  """Jitted eval-mode and train-mode (batch statistics) outputs of `module`."""
  eval_out = jax.jit(functools.partial(module.apply, train=False))(variables, *inputs)
  train_out, _ = jax.jit(functools.partial(module.apply, train=True,
                                           mutable=["batch_stats"]))(variables, *inputs)
  return eval_out, train_out


def test_aspp_matches_golden_in_eval_and_train_mode(golden):
  g = golden("heads.npz")
  x = g["aspp_in"].transpose(0, 2, 3, 1)
  aspp = deeplab.ASPP(features=256, rates=(2, 3, 4))
  abstract = jax.eval_shape(functools.partial(aspp.init, train=False), _key(), x)
  variables = _variables_from_recipe(abstract, g["aspp_state_names"], _ASPP_MODULES)
  eval_out, train_out = _eval_and_train(aspp, variables, x)
  np.testing.assert_allclose(_nchw(eval_out), g["aspp_eval_out"], **_GOLDEN_TOL)
  np.testing.assert_allclose(_nchw(train_out), g["aspp_train_out"], **_GOLDEN_TOL)


def test_deeplabv3plus_head_matches_golden_in_eval_and_train_mode(golden):
  g = golden("heads.npz")
  x_low = _seeded_input(g["dlv3p_x_low_seed_shape"])
  x_high = _seeded_input(g["dlv3p_layer4_seed_shape"])
  head = deeplab.DeepLabV3PlusHead(num_classes=5, rep_dim=16, head_dim=256, project_dim=48,
                                   aspp_rates=deeplab.ASPP_RATES[16])
  abstract = jax.eval_shape(functools.partial(head.init, train=False), _key(),
                            x_low, x_high)
  variables = _variables_from_recipe(abstract, g["dlv3p_head_state_names"], _DLV3P_MODULES)
  eval_out, train_out = _eval_and_train(head, variables, x_low, x_high)
  eval_pred, eval_rep = eval_out["logits"], eval_out["rep"]
  train_pred, train_rep = train_out["logits"], train_out["rep"]
  np.testing.assert_allclose(_nchw(eval_pred), g["dlv3p_eval_pred"], **_GOLDEN_TOL)
  np.testing.assert_allclose(_nchw(eval_rep), g["dlv3p_eval_rep"], **_GOLDEN_TOL)
  np.testing.assert_allclose(_nchw(train_pred), g["dlv3p_train_pred"], **_GOLDEN_TOL)
  np.testing.assert_allclose(_nchw(train_rep), g["dlv3p_train_rep"], **_GOLDEN_TOL)


def test_deeplabv2_head_matches_golden(golden):
  g = golden("heads.npz")
  x_high = _seeded_input(g["dlv2_layer4_seed_shape"])
  head = deeplab.DeepLabV2Head(num_classes=5, rep_dim=16)
  abstract = jax.eval_shape(functools.partial(head.init, train=False), _key(),
                            x_high)
  variables = _variables_from_recipe(abstract, g["dlv2_head_state_names"], _DLV2_MODULES)
  out = jax.jit(functools.partial(head.apply, train=False))(variables, x_high)
  pred, rep = out["logits"], out["rep"]
  np.testing.assert_allclose(_nchw(pred), g["dlv2_pred"], **_GOLDEN_TOL)
  np.testing.assert_allclose(_nchw(rep), g["dlv2_rep"], **_GOLDEN_TOL)
