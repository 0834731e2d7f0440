"""Tests for reco_jax.ema against the official EMA golden (ema.npz)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import ema


def _params(g, prefix, index=None):
  names = [str(n).replace(".", "_") for n in g["param_names"]]
  return {n: (g[f"{prefix}_{n}"] if index is None else g[f"{prefix}_{n}"][index]) for n in names}


def test_decay_matches_golden_schedule(golden):
  g = golden("ema.npz")
  assert g["alpha"] == np.float32(0.99)  # stored as f32; the official alpha is the double 0.99
  t = jnp.arange(int(g["steps"]), dtype=jnp.int32)
  got = jax.vmap(lambda s: ema.ema_decay(s, 0.99))(t)
  np.testing.assert_array_equal(np.asarray(got), g["decay_per_update"].astype(np.float32))
  # Warm-up values are exact rationals t/(t+1), then the cap.
  assert float(got[0]) == 0.0 and float(got[1]) == 0.5 and float(got[99]) == np.float32(0.99)
  assert float(ema.ema_decay(jnp.int32(10**6))) == np.float32(0.99)


def test_replay_golden_is_bit_exact(golden):
  g = golden("ema.npz")
  decay_max = 0.99
  teacher = jax.tree.map(jnp.asarray, _params(g, "init"))
  update = jax.jit(ema.ema_update, static_argnames="decay_max")
  for t in range(int(g["steps"])):
    student = jax.tree.map(jnp.asarray, _params(g, "student", t))
    teacher = update(teacher, student, jnp.int32(t), decay_max=decay_max)
    expected = _params(g, "teacher", t)
    for name, value in teacher.items():
      np.testing.assert_array_equal(np.asarray(value), expected[name], err_msg=f"step {t} {name}")
  # After the first update the teacher is the student (decay 0).
  np.testing.assert_array_equal(g["teacher_0_weight"][0], g["student_0_weight"][0])


def test_first_update_copies_student_into_new_buffers():
  student = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
  teacher = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
  for fn in (ema.ema_update, jax.jit(ema.ema_update)):
    new = fn(teacher, student, jnp.int32(0))
    for k in student:
      np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(student[k]))
      assert new[k].unsafe_buffer_pointer() != student[k].unsafe_buffer_pointer()
      assert new[k].unsafe_buffer_pointer() != teacher[k].unsafe_buffer_pointer()


def test_uniform_average_during_warm_up():
  rng = np.random.default_rng(0)
  iterates = rng.normal(size=(20, 5)).astype(np.float32)
  teacher = {"p": jnp.full((5,), 7.0)}
  for t in range(20):
    teacher = ema.ema_update(teacher, {"p": jnp.asarray(iterates[t])}, jnp.int32(t))
  np.testing.assert_allclose(np.asarray(teacher["p"]), iterates.mean(0), rtol=1e-5, atol=1e-6)


def test_other_caps():
  assert float(ema.ema_decay(jnp.int32(5), 0.0)) == 0.0
  assert float(ema.ema_decay(jnp.int32(5), 0.5)) == 0.5
  assert float(ema.ema_decay(jnp.int32(1), 0.9)) == 0.5
  assert float(ema.ema_decay(jnp.int32(500), 0.999)) == np.float32(500 / 501)
  assert float(ema.ema_decay(jnp.int32(5000), 0.999)) == np.float32(0.999)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_cap_raises(bad):
  with pytest.raises(ValueError, match="decay_max"):
    ema.ema_decay(jnp.int32(0), bad)
