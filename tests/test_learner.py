"""Train state, loss, clipping and the jitted update."""

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import fdqn
from fdqn import Batch, clip_by_tensor_norm, create_train_state, dqn_loss, make_optimizer

# A linear Q-network q(obs) = obs @ W with W = I, so Q-values equal the observations.
OBS = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
NEXT_OBS = np.array([[0.0, 5.0], [2.0, 1.0]], np.float32)
HAND_BATCH = Batch(
    obs=OBS,
    action=np.array([0, 1]),
    reward=np.array([1.0, 0.0], np.float32),
    next_obs=NEXT_OBS,
    terminated=np.array([False, True]),
)


def identity_state(optimizer=None):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)])
    model.layers[0].kernel.assign(np.eye(2, dtype=np.float32))
    return create_train_state(model, optimizer or optax.sgd(0.1), jax.random.key(0))


def random_batch(rng, size=16, obs_dim=4, num_actions=2):
    return Batch(
        obs=rng.normal(size=(size, obs_dim)).astype(np.float32),
        action=rng.integers(0, num_actions, size),
        reward=rng.normal(size=size).astype(np.float32),
        next_obs=rng.normal(size=(size, obs_dim)).astype(np.float32),
        terminated=rng.random(size) < 0.2,
    )


def mlp_state(seed=0, optimizer=None):
    model = fdqn.mlp(2, obs_dim=4, hidden=(16,), seed=seed)
    return create_train_state(
        model, optimizer or make_optimizer("adam", 1e-2), jax.random.key(seed)
    )


def loss_fn(state, batch, **kwargs):
    return dqn_loss(state.params, state.target_params, state.q_fn, batch, **kwargs)


def test_loss_by_hand(variant):
    # transition 1: target 1 + 0.5 * max(0, 5) = 3.5, q = 1, td 2.5, huber 2.0
    # transition 2: terminal, target 0, q = 4, td -4, huber 3.5
    state = identity_state()
    loss, aux = variant(lambda s, b: loss_fn(s, b, gamma=0.5))(state, HAND_BATCH)
    np.testing.assert_allclose(loss, 2.75, rtol=1e-6)
    np.testing.assert_allclose(aux["q_taken"], 2.5, rtol=1e-6)
    np.testing.assert_allclose(aux["td_abs"], 3.25, rtol=1e-6)


def test_loss_sum_and_unmasked_as_in_notebook(variant):
    state = identity_state()
    loss_sum, _ = variant(lambda s, b: loss_fn(s, b, gamma=0.5, reduction="sum"))(state, HAND_BATCH)
    np.testing.assert_allclose(loss_sum, 5.5, rtol=1e-6)
    # without terminal masking transition 2 bootstraps: target 0.5 * 2 = 1, td -3, huber 2.5
    unmasked = HAND_BATCH._replace(terminated=np.array([False, False]))
    loss, _ = variant(lambda s, b: loss_fn(s, b, gamma=0.5))(state, unmasked)
    np.testing.assert_allclose(loss, 2.25, rtol=1e-6)
    # mask_terminal=False ignores the flag: the same 2.25 from the real batch
    loss, _ = variant(lambda s, b: loss_fn(s, b, gamma=0.5, mask_terminal=False))(state, HAND_BATCH)
    np.testing.assert_allclose(loss, 2.25, rtol=1e-6)


def test_squared_loss_option(variant):
    state = identity_state()
    loss, _ = variant(lambda s, b: loss_fn(s, b, gamma=0.5, huber_delta=None))(state, HAND_BATCH)
    np.testing.assert_allclose(loss, (0.5 * 2.5**2 + 0.5 * 16.0) / 2, rtol=1e-6)


def test_double_q_loss_by_hand(variant):
    # Online W = I, target W = 2 I: transition 1's selector picks action 1 of next_obs [0, 5]
    # and the target values it at 10: target 1 + 0.5 * 10 = 6, td 5, huber 4.5.
    state = identity_state()
    state = state.replace(target_params=[2.0 * p for p in state.params])
    batch = HAND_BATCH._replace(terminated=np.array([False, True]))
    loss, aux = variant(lambda s, b: loss_fn(s, b, gamma=0.5, double_q=True))(state, batch)
    np.testing.assert_allclose(loss, (4.5 + 3.5) / 2, rtol=1e-6)


def test_gradient_and_update_by_hand():
    # d loss / d W: transition 1 pulls column 0 by -0.5 * obs1, transition 2 pushes
    # column 1 by +0.5 * obs2 (Huber gradients clipped to -1 and +1, mean over 2).
    state = identity_state(optax.sgd(0.1))
    grads = jax.grad(lambda p: dqn_loss(p, state.target_params, state.q_fn, HAND_BATCH, 0.5)[0])(
        state.params
    )
    expected = np.array([[-0.5, 1.5], [-1.0, 2.0]], np.float32)
    np.testing.assert_allclose(grads[0], expected, rtol=1e-6)
    new_state, metrics = fdqn.update(state, HAND_BATCH, gamma=0.5)
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(7.5), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], 2.75, rtol=1e-6)
    np.testing.assert_allclose(new_state.params[0], np.eye(2) - 0.1 * expected, rtol=1e-6)
    assert int(new_state.step) == 1


def test_per_tensor_clipping_invariants():
    clip = clip_by_tensor_norm(1.0)
    grads = {
        "big": jnp.array([3.0, 4.0]),
        "small": jnp.array([0.3, 0.4]),
        "at": jnp.array([0.6, 0.8]),
    }
    clipped, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(jnp.linalg.norm(clipped["big"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(clipped["big"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(clipped["small"], [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(clipped["at"], [0.6, 0.8], rtol=1e-6)


def test_per_tensor_matches_tf_clip_by_norm_formula():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 7)).astype(np.float32) * 3
    clipped, _ = clip_by_tensor_norm(2.0).update([g], None)
    expected = g * 2.0 / max(np.linalg.norm(g), 2.0)
    np.testing.assert_allclose(clipped[0], expected, rtol=1e-6)


def test_global_clipping_is_optax_and_scales_by_the_joint_norm(variant):
    # a joint norm of 13: sqrt(3^2 + 4^2 + 12^2); bound 6.5 halves every gradient
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}
    clip = optax.clip_by_global_norm(6.5)
    clipped, _ = variant(clip.update)(grads, clip.init(grads))
    np.testing.assert_allclose(clipped["a"], [1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[6.0]], rtol=1e-6)
    # make_optimizer's chain is optax's clipping, then Adam
    ours = make_optimizer("adam", 1e-2, clip="global", max_grad_norm=6.5)
    reference = optax.chain(optax.clip_by_global_norm(6.5), optax.adam(1e-2, eps=1e-8))
    got, _ = variant(ours.update)(grads, ours.init(grads), grads)
    want, _ = reference.update(grads, reference.init(grads), grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, want)


def _rmsprop_reference(grad_steps, lr=1e-3):
    """Keras RMSprop by hand: v = 0.9 v + 0.1 g^2; update = -lr g / sqrt(v + 1e-7)."""
    v = [np.zeros_like(g) for g in grad_steps[0]]
    out = []
    for grads in grad_steps:
        v = [0.9 * vi + 0.1 * g**2 for vi, g in zip(v, grads)]
        out.append([-lr * g / np.sqrt(vi + 1e-7) for vi, g in zip(v, grads)])
    return out


@pytest.mark.parametrize("clip", ["per_tensor", "global", "none"])
def test_optimizer_clips_before_rmsprop(clip):
    steps = [
        [np.array([30.0, 40.0], np.float32), np.array([0.0, 0.5], np.float32)],
        [np.array([0.3, -0.4], np.float32), np.array([0.1, 0.2], np.float32)],
    ]
    if clip == "per_tensor":  # tensor norms 50 and 0.5: only the first is scaled, to norm 1
        clipped = [[g * 1.0 / max(np.linalg.norm(g), 1.0) for g in gs] for gs in steps]
    elif clip == "global":  # joint norm of step 1 is sqrt(2500.25): both scaled by its inverse
        clipped = [
            [g / max(np.sqrt(sum(np.sum(x**2) for x in gs)), 1.0) for g in gs] for gs in steps
        ]
    else:
        clipped = steps
    expected = _rmsprop_reference(clipped)
    opt = make_optimizer("rmsprop", 1e-3, clip=clip, max_grad_norm=1.0)
    opt_state = opt.init([jnp.asarray(g) for g in steps[0]])
    for grads, want in zip(steps, expected):
        updates, opt_state = opt.update([jnp.asarray(g) for g in grads], opt_state)
        for u, w in zip(updates, want):
            np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-9)


def test_rmsprop_matches_keras_rmsprop_defaults():
    # One step of Keras' RMSprop from zero accumulators: v = 0.1 g^2, step = lr g / sqrt(v + 1e-7)
    g = jnp.array([0.5, -2.0])
    opt = make_optimizer("rmsprop", 1e-3, clip="none")
    updates, _ = opt.update([g], opt.init([g]))
    expected = -1e-3 * g / np.sqrt(0.1 * g**2 + 1e-7)
    np.testing.assert_allclose(updates[0], expected, rtol=1e-5)


def test_update_lowers_loss_on_fixed_batch():
    batch = random_batch(np.random.default_rng(0))
    state = mlp_state()
    first = float(loss_fn(state, batch)[0])
    for _ in range(30):
        state, _ = fdqn.update(state, batch)
    assert float(loss_fn(state, batch)[0]) < 0.5 * first


def test_same_seed_same_parameters():
    batch = random_batch(np.random.default_rng(1))
    runs = []
    for _ in range(2):
        state = mlp_state(seed=7)
        for _ in range(5):
            state, _ = fdqn.update(state, batch)
        runs.append(state.params)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_old_state_unchanged_by_update():
    state = mlp_state()
    before = jax.tree.map(np.array, (state.params, state.target_params, state.opt_state))
    new_state, _ = fdqn.update(state, random_batch(np.random.default_rng(2)))
    after = jax.tree.map(np.array, (state.params, state.target_params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(state.step) == 0 and int(new_state.step) == 1
    assert not np.array_equal(new_state.params[0], state.params[0])


def test_update_passes_the_target_and_key_through_uncopied():
    state = mlp_state()
    new_state, _ = fdqn.update(state, random_batch(np.random.default_rng(4)))
    assert all(a is b for a, b in zip(new_state.target_params, state.target_params))
    assert new_state.key is state.key
    # and inside the caller's own jit it is the same pure function
    jitted, _ = jax.jit(fdqn.update)(state, random_batch(np.random.default_rng(4)))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, jitted.params, new_state.params)
    jax.tree.map(np.testing.assert_array_equal, jitted.target_params, state.target_params)


def test_target_copy_is_independent_of_later_updates():
    batch = random_batch(np.random.default_rng(3))
    state = mlp_state()
    for _ in range(3):
        state, _ = fdqn.update(state, batch)
    state = fdqn.sync_target(state)
    snapshot = [np.array(p) for p in state.params]
    jax.tree.map(np.testing.assert_array_equal, state.target_params, snapshot)
    for _ in range(5):
        state, _ = fdqn.update(state, batch)
    jax.tree.map(np.testing.assert_array_equal, state.target_params, snapshot)
    assert not np.array_equal(state.params[0], snapshot[0])


def test_polyak_update():
    state = identity_state()
    state = state.replace(target_params=[jnp.zeros((2, 2))])
    state = fdqn.sync_target(state, tau=0.25)
    np.testing.assert_allclose(state.target_params[0], 0.25 * np.eye(2))
    with pytest.raises(ValueError, match="tau"):
        fdqn.sync_target(state, tau=0.0)


def test_train_state_is_a_pytree_with_static_functions():
    state = mlp_state()
    leaves = jax.tree.leaves(state)
    assert not any(callable(leaf) for leaf in leaves)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    with pytest.raises(AttributeError):
        state.step = 3  # frozen


def test_next_key_splits():
    state = mlp_state()
    new_state, key = state.next_key()
    assert not np.array_equal(jax.random.key_data(new_state.key), jax.random.key_data(state.key))
    assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(new_state.key))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(action=np.array([0.0, 1.0])), "batch.action must be integers"),
        (dict(reward=np.zeros((2, 1), np.float32)), "batch.reward must have shape"),
        (dict(terminated=np.zeros(3, bool)), "batch.terminated must have shape"),
        (dict(next_obs=np.zeros((2, 3), np.float32)), "batch.next_obs has shape"),
        (dict(next_obs=NEXT_OBS.astype(np.float16)), "batch.next_obs has dtype"),
        (dict(obs=np.zeros(2, np.float32)), "batch.obs must have shape"),
    ],
)
def test_bad_batch_gives_clear_error(change, message):
    state = identity_state()
    with pytest.raises(ValueError, match=message):
        fdqn.update(state, HAND_BATCH._replace(**change))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="sgd"), "optimizer must be one of"),
        (dict(clip="value"), "clip must be one of"),
        (dict(learning_rate=0.0), "learning_rate must be a positive finite number"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be a positive finite number"),
    ],
)
def test_bad_optimizer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(**kwargs)
