"""fdqn and the TF port of the notebook compute the same numbers from the same weights.

The speed comparison in benchmarks/compare.py is fair only if both sides do
the same arithmetic: same Q-values, TD errors, loss, gradients and optimizer
step. TensorFlow and tf-keras come with the ``tf`` extra (CI installs it);
without them these tests skip.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdqn
from fdqn import Batch

pytest.importorskip("tf_keras")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as benchmarks/tf_notebook.py runs TF
tf = pytest.importorskip("tensorflow")

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "tf_notebook.py")
_spec = importlib.util.spec_from_file_location("tf_notebook", _PATH)
tf_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tf_notebook)

NUM_ACTIONS = 4

# (network, fdqn model, learner settings of both sides, batch size)
CONFIGS = {
    "notebook": dict(
        model=lambda: fdqn.notebook_cnn(NUM_ACTIONS, scale_obs=False),
        optimizer=lambda: fdqn.make_optimizer(
            "rmsprop", 1e-3, clip="per_tensor", max_grad_norm=1.0
        ),
        clip="per_tensor",
        max_grad_norm=1.0,
        batch=64,
    ),
    "nature": dict(
        model=lambda: fdqn.nature_cnn(NUM_ACTIONS),
        optimizer=lambda: fdqn.make_optimizer("adam", 1e-4, clip="global", max_grad_norm=10.0),
        clip="global",
        max_grad_norm=10.0,
        batch=32,
    ),
}
# (reduction, mask_terminal): the notebook's bugs, and fdqn's fixed default
MODES = {"faithful": ("sum", False), "fixed": ("mean", True)}


def make_batch(size, seed=0):
    rng = np.random.default_rng(seed)
    return Batch(
        obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        action=rng.integers(0, NUM_ACTIONS, size),
        reward=rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), size),
        next_obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        terminated=rng.random(size) < 0.3,
    )


def tf_arrays(batch):
    """The batch as the TF side takes it: float32 channels-last pixels."""
    return (
        np.transpose(batch.obs, (0, 2, 3, 1)).astype(np.float32),
        batch.action.astype(np.int64),
        batch.reward.astype(np.float32),
        np.transpose(batch.next_obs, (0, 2, 3, 1)).astype(np.float32),
        batch.terminated.astype(np.float32),
    )


def both_sides(name, mode, compiled=False):
    """A TF learner and an fdqn train state with the same (distinct) online and target weights."""
    config = CONFIGS[name]
    reduction, mask_terminal = MODES[mode]
    tf.random.set_seed(1)
    tf_learner = tf_notebook.make_learner(
        name,
        (84, 84, 4),
        NUM_ACTIONS,
        config="notebook" if name == "notebook" else "nature",
        reduction=reduction,
        mask_terminal=mask_terminal,
        compiled=compiled,
    )
    # a target different from the online network, so a mix-up would show
    rng = np.random.default_rng(2)
    tf_learner.target_model.set_weights(
        [
            w + 0.01 * rng.standard_normal(w.shape).astype(np.float32)
            for w in tf_learner.policy_model.get_weights()
        ]
    )
    model = config["model"]()
    model.set_weights(tf_learner.policy_model.get_weights())
    state = fdqn.create_train_state(model, config["optimizer"](), jax.random.key(0))
    target = [jnp.asarray(w) for w in tf_learner.target_model.get_weights()]
    state = state.replace(target_params=target)
    kwargs = dict(gamma=0.99, reduction=reduction, mask_terminal=mask_terminal)
    return tf_learner, state, kwargs


def scale(x):
    return float(np.max(np.abs(x))) + 1e-6


def assert_close(actual, desired, rtol=2e-4):
    actual, desired = np.asarray(actual), np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale(desired))


def assert_gradients_close(grads, tf_grads, output_rtol=1e-4):
    """The output layer entry by entry, the layers below it as whole tensors.

    The output layer's gradient is the TD error times the last hidden activations: float32
    rounding moves it by about 1e-6. Below a ReLU, a unit whose pre-activation lies within
    rounding of 0 may be on one side in XLA and on the other in TF; its backward signal is
    then passed on one side only, and every layer below it differs by that one unit's share.
    Perturbing the weights by 1e-6 (relative) flips such a unit in about 2 draws of 5 and
    moves the layers below by up to 1.5e-3 of their norm on one CPU, 7.6e-3 on another; a
    wrong derivative differs by order 1. Clipping by the global norm carries that difference
    into the output layer as well, through the norm: ``output_rtol`` widens for it."""
    assert len(grads) == len(tf_grads)
    *hidden, out_kernel, out_bias = [
        (np.asarray(g), np.asarray(t)) for g, t in zip(grads, tf_grads)
    ]
    for g, tf_g in (out_kernel, out_bias):
        assert np.linalg.norm(g - tf_g) <= output_rtol * np.linalg.norm(tf_g)
        assert_close(g, tf_g, rtol=output_rtol)
    for g, tf_g in hidden:
        assert np.linalg.norm(g - tf_g) <= 3e-2 * np.linalg.norm(tf_g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_q_values_td_errors_loss_and_gradients_agree(name, mode, variant):
    tf_learner, state, kwargs = both_sides(name, mode)
    batch = make_batch(CONFIGS[name]["batch"])
    arrays = tf_arrays(batch)

    tf_learner.clip = "none"
    tf_loss, tf_td, tf_q, tf_grads = tf_learner.loss_and_gradients(*arrays)

    q = variant(state.q_fn)(state.params, batch.obs)
    assert_close(q, tf_q)

    def loss(params):
        return fdqn.dqn_loss(params, state.target_params, state.q_fn, batch, **kwargs)[0]

    loss_value, grads = variant(jax.value_and_grad(loss))(state.params)
    assert_close(loss_value, tf_loss)
    assert_gradients_close(grads, tf_grads)

    # TD errors: fdqn's are target - prediction, the notebook's prediction - target
    q_t = state.q_fn(state.target_params, batch.next_obs)
    reduction, mask_terminal = MODES[mode]
    discount = (
        0.99 * (1.0 - batch.terminated) if mask_terminal else np.full(len(batch.action), 0.99)
    )
    td = variant(jax.vmap(fdqn.q_learning))(
        q,
        jnp.asarray(batch.action),
        jnp.asarray(batch.reward),
        jnp.asarray(discount, jnp.float32),
        q_t,
    )
    assert_close(-td, tf_td)


@pytest.mark.parametrize("name", CONFIGS)
def test_clipped_gradients_agree(name):
    tf_learner, state, kwargs = both_sides(name, "faithful")
    batch = make_batch(CONFIGS[name]["batch"], seed=3)
    _, _, _, tf_clipped = tf_learner.loss_and_gradients(*tf_arrays(batch))

    grads = jax.grad(
        lambda p: fdqn.dqn_loss(p, state.target_params, state.q_fn, batch, **kwargs)[0]
    )(state.params)
    config = CONFIGS[name]
    if config["clip"] == "per_tensor":
        clip = fdqn.clip_by_tensor_norm(config["max_grad_norm"])
    else:
        import optax

        clip = optax.clip_by_global_norm(config["max_grad_norm"])
    clipped, _ = clip.update(grads, clip.init(grads))
    assert_gradients_close(clipped, tf_clipped, 1e-4 if config["clip"] == "per_tensor" else 1e-2)
    # the faithful summed loss has large gradients: clipping is active, so the test means something
    norms = [float(np.linalg.norm(g)) for g in grads]
    assert max(norms) > config["max_grad_norm"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("mode", MODES)
def test_one_rmsprop_step_gives_the_same_parameters(mode, compiled):
    """The notebook config: RMSProp 1e-3 after per-tensor clipping at 1."""
    tf_learner, state, kwargs = both_sides("notebook", mode, compiled=compiled)
    batch = make_batch(64, seed=4)
    before = [np.array(p) for p in state.params]
    for _ in range(2):  # two steps: the second uses RMSProp's running average
        tf_learner.update(*tf_arrays(batch))
        state, _ = fdqn.update(state, batch, **kwargs)
    moved = False
    for p, tf_p, p0 in zip(state.params, tf_learner.policy_model.get_weights(), before):
        np.testing.assert_allclose(p, tf_p, rtol=1e-4, atol=1e-5)
        moved |= bool(np.max(np.abs(tf_p - p0)) > 1e-4)
    assert moved


def test_one_adam_step_gives_the_same_parameters():
    """The Nature config: Adam 1e-4 after global-norm clipping at 10.

    Keras adds its epsilon to sqrt(v) before bias correction, optax to the
    bias-corrected sqrt(v_hat). At step t they agree when Keras' epsilon is
    optax's times sqrt(1 - beta2^t); the test sets it for t = 1."""
    tf_learner, state, kwargs = both_sides("nature", "fixed")
    tf_learner.optimizer = tf.keras.optimizers.Adam(1e-4, epsilon=1e-8 * np.sqrt(1 - 0.999))
    batch = make_batch(32, seed=5)
    before = [np.array(p) for p in state.params]
    tf_learner.update(*tf_arrays(batch))
    state, _ = fdqn.update(state, batch, **kwargs)
    for p, tf_p, p0 in zip(state.params, tf_learner.policy_model.get_weights(), before):
        ours, theirs = np.asarray(p) - p0, tf_p - p0
        # Adam's first step is lr * g / (|g| + eps): about lr where |g| >> eps, and
        # ill-conditioned where |g| is within a few eps of 0 (a step under lr / 2), where
        # float32 rounding of g moves it visibly; there both steps only stay within lr
        sure = np.abs(theirs) > 0.5e-4
        np.testing.assert_allclose(ours[sure], theirs[sure], rtol=1e-3, atol=5e-6)
        assert np.all(np.abs(ours - theirs) <= 1e-4 * (1 + 1e-3))
        # a good share moved by about lr: not all, since the fc kernel's rows for inputs
        # that the ReLU zeroes over the whole batch get no gradient (0.48-0.67 of its
        # entries moved by over lr / 2 in repeated runs: TF's side is not bit-reproducible)
        assert np.mean(sure) > 0.25 and np.max(np.abs(theirs)) > 5e-5


@pytest.mark.parametrize("name", ["notebook", "nature"])
def test_greedy_actions_agree(name):
    tf_learner, state, _ = both_sides(name, "fixed", compiled=True)
    batch = make_batch(16, seed=6)
    tf_actions = tf_learner.greedy_actions(tf_arrays(batch)[0])
    actions = fdqn.select_actions(state.q_fn, state.params, jax.random.key(0), batch.obs, 0.0)
    np.testing.assert_array_equal(np.asarray(actions), tf_actions)


def test_notebook_loop_plays_and_learns_on_cartpole():
    loop = tf_notebook.NotebookLoop("CartPole-v1", compiled=True, seed=0)
    before = [w.copy() for w in loop.learner.policy_model.get_weights()]
    loop.advance(200)
    assert loop.step == 200 and loop.episode >= 1 and len(loop.memory) == 200
    after = loop.learner.policy_model.get_weights()
    assert any(np.max(np.abs(a - b)) > 0 for a, b in zip(after, before))
