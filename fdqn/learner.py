"""The DQN learner: train state, optimizer, loss and the jit-compiled update.

Everything here is pure. ``TrainState`` is an immutable pytree; the update
takes a state and a batch and returns a new state and metrics, leaving its
inputs untouched. The online and target networks are two parameter pytrees of
one Keras model; the target is refreshed by copy (or Polyak averaging).
"""

import dataclasses
import functools
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
from jax.experimental import checkify

from fdqn.networks import Params, QFn, pure_q_fn
from fdqn.value_learning import double_q_learning, huber_loss, q_learning, squared_loss

CLIP_MODES = ("per_tensor", "global", "none")
OPTIMIZERS = ("adam", "rmsprop")
REDUCTIONS = ("mean", "sum")


class Batch(NamedTuple):
    """A batch of transitions ``(s_tm1, a_tm1, r_t, terminated_t, s_t)``.

    Attributes:
      obs: ``(B, *obs_shape)`` observations at which the actions were taken.
      action: ``(B,)`` integer actions.
      reward: ``(B,)`` rewards (clipped ones, on Atari).
      next_obs: ``(B, *obs_shape)`` observations after the actions.
      terminated: ``(B,)`` bool or 0/1 float: the next state is terminal (no
        bootstrap). Truncation by a time limit is not termination.
    """

    obs: Any
    action: Any
    reward: Any
    next_obs: Any
    terminated: Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "target_params", "opt_state", "key"],
    meta_fields=["q_fn", "optimizer"],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Immutable state of a DQN learner, a JAX pytree.

    Attributes:
      step: number of gradient updates applied, int32 scalar.
      params: online network parameters (list of arrays).
      target_params: target network parameters, same structure as ``params``.
      opt_state: optimizer state for ``params``.
      key: PRNG key for whatever randomness the caller draws (exploration).
      q_fn: ``q_fn(params, obs) -> q_values``; static, not a leaf.
      optimizer: the optax transformation; static, not a leaf.
    """

    step: jax.Array
    params: Params
    target_params: Params
    opt_state: optax.OptState
    key: jax.Array
    q_fn: QFn
    optimizer: optax.GradientTransformation

    def replace(self, **changes: Any) -> "TrainState":
        """Returns a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def next_key(self) -> tuple["TrainState", jax.Array]:
        """Splits the state's key: returns a state with a fresh key, and a key to use."""
        key, use = jax.random.split(self.key)
        return self.replace(key=key), use


def create_train_state(
    model: keras.Model, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """Builds a learner state from a built Keras model, an optimizer and a key.

    The target parameters start as a copy of the model's current weights.

    Args:
      model: a built ``keras.Model`` mapping observations to Q-values.
      optimizer: an optax transformation, e.g. from :func:`make_optimizer`.
      key: a JAX PRNG key.

    Returns:
      A ``TrainState`` with ``step == 0``.
    """
    q_fn, params = pure_q_fn(model)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        key=key,
        q_fn=q_fn,
        optimizer=optimizer,
    )


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales each gradient tensor separately so its L2 norm is at most ``max_norm``.

    ``g * max_norm / max(||g||, max_norm)`` for every leaf, as TF's
    ``tf.clip_by_norm`` applied to each gradient (what the notebook does). This
    differs from :func:`optax.clip_by_global_norm`, which scales all tensors by
    one factor computed from their joint norm; optax has no per-tensor form.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")

    def clip(g: jax.Array, _: Any) -> jax.Array:
        return g * (max_norm / jnp.maximum(optax.tree.norm(g), max_norm))

    return optax.stateless_with_tree_map(clip)


def make_optimizer(
    name: str = "adam",
    learning_rate: float | optax.Schedule = 1e-4,
    clip: str = "global",
    max_grad_norm: float = 10.0,
    eps: float | None = None,
) -> optax.GradientTransformation:
    """Gradient clipping followed by Adam or RMSProp, as one optax chain.

    Args:
      name: ``"adam"`` (Kingma and Ba 2015; optax defaults, eps 1e-8) or
        ``"rmsprop"`` (decay 0.9, eps 1e-7 inside the square root, zero
        initial accumulator: ``keras.optimizers.RMSprop``'s defaults, which
        replace the notebook's TF1 ``RMSPropOptimizer``).
      learning_rate: a positive float or an optax schedule.
      clip: ``"per_tensor"`` (each gradient's norm clipped separately, as the
        notebook's ``tf.clip_by_norm``), ``"global"`` (all gradients scaled by
        one factor so their joint norm is at most ``max_grad_norm``, as OpenAI
        Baselines), or ``"none"``.
      max_grad_norm: the clipping bound; positive.
      eps: the optimizer's epsilon, if not its default above.

    Returns:
      An ``optax.GradientTransformation``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    if not callable(learning_rate) and not (0 < learning_rate < float("inf")):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate}")
    if clip != "none" and not (0 < max_grad_norm < float("inf")):
        raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
    if name == "adam":
        opt = optax.adam(learning_rate, eps=1e-8 if eps is None else eps)
    else:
        opt = optax.rmsprop(learning_rate, decay=0.9, eps=1e-7 if eps is None else eps)
    if clip == "per_tensor":
        return optax.chain(clip_by_tensor_norm(max_grad_norm), opt)
    if clip == "global":
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)
    return opt


def _dtype(x: Any) -> np.dtype:
    """The dtype of an array, or the one JAX would give a Python value or list."""
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else jnp.result_type(x)


def _check_batch(batch: Batch) -> None:
    """Raises a one-line ValueError when the batch's fields do not fit together."""
    obs_shape = np.shape(batch.obs)
    if len(obs_shape) < 2:
        raise ValueError(f"batch.obs must have shape (B, *obs_shape), got {obs_shape}")
    size = obs_shape[0]
    if np.shape(batch.next_obs) != obs_shape:
        raise ValueError(
            f"batch.next_obs has shape {np.shape(batch.next_obs)}, batch.obs has {obs_shape}"
        )
    if _dtype(batch.next_obs) != _dtype(batch.obs):
        raise ValueError(
            f"batch.next_obs has dtype {_dtype(batch.next_obs)}, batch.obs has {_dtype(batch.obs)}"
        )
    for name in ("action", "reward", "terminated"):
        shape = np.shape(getattr(batch, name))
        if shape != (size,):
            raise ValueError(
                f"batch.{name} must have shape ({size},) to match batch.obs, got {shape}"
            )
    if not np.issubdtype(_dtype(batch.action), np.integer):
        raise ValueError(f"batch.action must be integers, got dtype {_dtype(batch.action)}")


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _check_options(gamma: Any, huber_delta: Any, reduction: str) -> None:
    """One-line ValueErrors for loss options outside their ranges (concrete values only)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(gamma, (int, float, np.number)) and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if huber_delta is not None and not (0.0 <= huber_delta < float("inf")):
        raise ValueError(
            f"huber_delta must be a finite number >= 0, or None or 0 for the squared loss, "
            f"got {huber_delta}"
        )


_NUM_ACTIONS: "weakref.WeakKeyDictionary[QFn, dict]" = weakref.WeakKeyDictionary()


def num_actions(q_fn: QFn, params: Params, obs: Any) -> int:
    """How many actions ``q_fn(params, obs)`` values (its last axis), without computing it.

    Found by tracing once per network and observation shape, then remembered.
    """
    dtype = _dtype(obs)
    known = _NUM_ACTIONS.setdefault(q_fn, {})
    shape = np.shape(obs)
    key = (shape[1:], dtype)
    if key not in known:
        spec = jax.ShapeDtypeStruct(shape, dtype)
        known[key] = int(jax.eval_shape(q_fn, params, spec).shape[-1])
    return known[key]


def check_batch_values(batch: Batch, num_actions: int) -> None:
    """Refuses a concrete batch whose actions or terminal flags are out of range.

    Actions must be in ``[0, num_actions)`` and ``terminated`` bool or 0/1.
    One-line ValueError naming the first bad value. The arrays are read on
    the host: for device arrays that is a transfer, which the training loop
    avoids by passing the numpy batches of :class:`fdqn.ReplayMemory`.
    """
    action = np.asarray(batch.action)
    bad = (action < 0) | (action >= num_actions)
    if np.count_nonzero(bad):
        raise ValueError(
            f"batch.action holds {action[bad].flat[0]}: actions must be in [0, {num_actions}) "
            f"for this network"
        )
    terminated = np.asarray(batch.terminated)
    if terminated.dtype != bool:
        odd = (terminated != 0) & (terminated != 1)
        if np.count_nonzero(odd):
            raise ValueError(
                f"batch.terminated holds {terminated[odd].flat[0]}: it must be bool or 0/1"
            )


def _checkify_batch_values(batch: Batch, num_actions: int) -> None:
    """:func:`check_batch_values` as ``checkify`` checks, for traced batches."""
    action = jnp.asarray(batch.action)
    checkify.check(
        jnp.all((action >= 0) & (action < num_actions)),
        "batch.action holds {a}: actions must be in [0, {n}) for this network",
        a=action[jnp.argmax((action < 0) | (action >= num_actions))],
        n=jnp.asarray(num_actions),
    )
    terminated = jnp.asarray(batch.terminated)
    if terminated.dtype != jnp.bool_:
        checkify.check(
            jnp.all((terminated == 0) | (terminated == 1)),
            "batch.terminated holds {t}: it must be bool or 0/1",
            t=terminated[jnp.argmax((terminated != 0) & (terminated != 1))],
        )


def dqn_loss(
    params: Params,
    target_params: Params,
    q_fn: QFn,
    batch: Batch,
    gamma: float = 0.99,
    double_q: bool = False,
    huber_delta: float | None = 1.0,
    reduction: str = "mean",
    mask_terminal: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DQN loss of a batch, and diagnostics.

    TD errors come from :func:`q_learning` (or :func:`double_q_learning`) with
    ``discount_t = gamma * (1 - terminated)``; the loss is the Huber loss of
    each TD error, averaged over the batch. The notebook summed over the
    batch and bootstrapped from terminal states; ``reduction="sum"`` gives its
    sum and ``mask_terminal=False`` its bootstrapping (kept for the benchmark
    against the notebook, not for learning).

    Args:
      params: online parameters (differentiated).
      target_params: target parameters (not differentiated).
      q_fn: ``q_fn(params, obs) -> (B, num_actions)``.
      batch: a :class:`Batch`.
      gamma: discount factor in [0, 1].
      double_q: use double Q-learning targets.
      huber_delta: the Huber threshold, positive; ``None`` or 0 for the
        squared loss (as ``--huber-delta 0`` on the command line).
      reduction: ``"mean"`` or ``"sum"`` over the batch.
      mask_terminal: zero the bootstrap term after a terminal transition.

    Returns:
      ``(loss, aux)`` where aux has ``q_taken`` (mean Q of the taken actions)
      and ``td_abs`` (mean absolute TD error).
    """
    _check_batch(batch)
    _check_options(gamma, huber_delta, reduction)
    q_tm1 = q_fn(params, batch.obs)
    q_t = q_fn(target_params, batch.next_obs)
    action = jnp.asarray(batch.action, jnp.int32)
    reward = jnp.asarray(batch.reward, q_tm1.dtype)
    if mask_terminal:
        discount = gamma * (1.0 - jnp.asarray(batch.terminated, q_tm1.dtype))
    else:
        discount = jnp.full_like(reward, gamma)
    if double_q:
        q_t_selector = jax.lax.stop_gradient(q_fn(params, batch.next_obs))
        td = jax.vmap(double_q_learning)(q_tm1, action, reward, discount, q_t, q_t_selector)
    else:
        td = jax.vmap(q_learning)(q_tm1, action, reward, discount, q_t)
    squared = huber_delta is None or huber_delta == 0
    losses = squared_loss(td) if squared else huber_loss(td, huber_delta)
    loss = jnp.mean(losses) if reduction == "mean" else jnp.sum(losses)
    q_taken = jnp.take_along_axis(q_tm1, action[:, None], axis=1)
    return loss, {"q_taken": jnp.mean(q_taken), "td_abs": jnp.mean(jnp.abs(td))}


def update(
    state: TrainState,
    batch: Batch,
    gamma: float = 0.99,
    double_q: bool = False,
    huber_delta: float | None = 1.0,
    reduction: str = "mean",
    mask_terminal: bool = True,
    checked: bool = False,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One gradient step on ``batch``; pure, computed by one jit-compiled call.

    A concrete batch (numpy or JAX arrays) is checked first: actions outside
    ``[0, num_actions)`` or ``terminated`` values other than 0/1 raise a
    one-line ValueError (:func:`check_batch_values`). A traced batch (inside
    your own ``jax.jit``, ``scan`` or ``vmap``) cannot be read there: by
    default it is not checked, and an out-of-range action indexes as JAX
    indexing does (clamped to the last action; -1 counts from the end).
    With ``checked=True`` the same checks are compiled in as
    ``jax.experimental.checkify`` checks, for a caller that wraps its
    function in ``checkify.checkify`` and reads the error it returns.

    Args:
      state: the learner state.
      batch: a :class:`Batch`.
      gamma, double_q, huber_delta, reduction, mask_terminal: as in :func:`dqn_loss`
        (static: each new value compiles once).
      checked: compile the batch checks in, for use under ``checkify.checkify``.
      axis_name: inside ``jax.shard_map`` (or ``pmap``) over a mesh axis of
        that name, each device holding a slice of the global batch: the
        gradients and figures are averaged over the axis (summed for
        ``reduction="sum"``) before the optimizer sees them, so every device
        takes the step of the whole batch and the parameters stay replicated.

    Returns:
      ``(new_state, metrics)``; metrics hold ``loss``, ``q_taken``,
      ``td_abs`` and ``grad_norm`` (global norm before clipping). The new
      state shares ``target_params`` and ``key`` with ``state``: the compiled
      step returns only what it changes, so it does not copy the target
      network on every update.
    """
    _check_batch(batch)
    _check_options(gamma, huber_delta, reduction)
    traced = _is_traced(batch)
    if not traced:
        check_batch_values(batch, num_actions(state.q_fn, state.params, batch.obs))
    step, params, opt_state, metrics = _gradient_step(
        state, batch, gamma, double_q, huber_delta, reduction, mask_terminal,
        checked and traced, axis_name,
    )  # fmt: skip
    return state.replace(step=step, params=params, opt_state=opt_state), metrics


@functools.partial(
    jax.jit,
    static_argnames=(
        "gamma", "double_q", "huber_delta", "reduction", "mask_terminal", "checked", "axis_name"
    ),
)  # fmt: skip
def _gradient_step(
    state, batch, gamma, double_q, huber_delta, reduction, mask_terminal, checked, axis_name
):
    """The parts of the state :func:`update` changes: step, params, opt_state; and metrics."""
    if checked:
        _checkify_batch_values(batch, num_actions(state.q_fn, state.params, batch.obs))
    grad_fn = jax.value_and_grad(dqn_loss, has_aux=True)
    (loss, aux), grads = grad_fn(
        state.params,
        state.target_params,
        state.q_fn,
        batch,
        *(gamma, double_q, huber_delta, reduction, mask_terminal),  # dqn_loss's order
    )
    if axis_name is not None:  # the whole batch's gradient: a mean of equal slices' means
        reduce = jax.lax.pmean if reduction == "mean" else jax.lax.psum
        grads, loss = reduce((grads, loss), axis_name)
        aux = jax.lax.pmean(aux, axis_name)
    updates, opt_state = state.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return state.step + 1, params, opt_state, metrics


def sync_target(state: TrainState, tau: float = 1.0) -> TrainState:
    """Refreshes the target network from the online one.

    ``tau == 1`` copies the online parameters (Mnih et al. 2015); ``0 < tau < 1``
    moves the target a fraction ``tau`` towards them (Polyak averaging,
    Lillicrap et al. 2016): ``target = tau * online + (1 - tau) * target``.

    The copy is a new set of buffers, so nothing later done to ``params``
    (including donation to a jitted update) reaches ``target_params``.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if tau == 1.0:
        target = jax.tree.map(jnp.copy, state.params)
    else:
        target = optax.incremental_update(state.params, state.target_params, tau)
    return state.replace(target_params=target)
