"""Temporal-difference errors and losses for Q-learning.

The TD functions are written for one transition, with ``_tm1`` for the time
step of the action and ``_t`` for the step after it, and batched by the caller
with ``jax.vmap``. They return ``target - prediction``; the bootstrap target is
wrapped in ``jax.lax.stop_gradient`` so only the prediction is trained.

``discount_t`` is ``gamma * (1 - terminated_t)``: a terminated transition does
not bootstrap, a truncated one (time limit) does. The notebook fdqn started
from bootstrapped from every next state; pass ``discount_t = gamma`` to get
that behaviour.
"""

import chex
import jax
import jax.numpy as jnp
import optax


def q_learning(
    q_tm1: jax.Array,
    a_tm1: jax.Array,
    r_t: jax.Array,
    discount_t: jax.Array,
    q_t: jax.Array,
) -> jax.Array:
    """TD error of one-step Q-learning (Watkins 1989; Mnih et al. 2015).

    ``td = r_t + discount_t * max_a q_t[a] - q_tm1[a_tm1]``.

    Args:
      q_tm1: Q-values at the first state, shape ``(num_actions,)``.
      a_tm1: action taken there, integer scalar.
      r_t: reward received, scalar.
      discount_t: discount of the next state, scalar (0 where it is terminal).
      q_t: Q-values at the next state, from the target network, ``(num_actions,)``.

    Returns:
      The TD error, a scalar.
    """
    chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, q_t], [1, 0, 0, 0, 1])
    chex.assert_type([a_tm1], int)
    chex.assert_equal_shape([q_tm1, q_t])
    target = r_t + discount_t * jnp.max(q_t)
    return jax.lax.stop_gradient(target) - q_tm1[a_tm1]


def double_q_learning(
    q_tm1: jax.Array,
    a_tm1: jax.Array,
    r_t: jax.Array,
    discount_t: jax.Array,
    q_t_value: jax.Array,
    q_t_selector: jax.Array,
) -> jax.Array:
    """TD error of double Q-learning (van Hasselt et al. 2016).

    The next action is chosen by ``q_t_selector`` (the online network) and
    valued by ``q_t_value`` (the target network):
    ``td = r_t + discount_t * q_t_value[argmax q_t_selector] - q_tm1[a_tm1]``.

    Args:
      q_tm1: Q-values at the first state, ``(num_actions,)``.
      a_tm1: action taken there, integer scalar.
      r_t: reward received, scalar.
      discount_t: discount of the next state, scalar (0 where it is terminal).
      q_t_value: next-state Q-values that value the chosen action, ``(num_actions,)``.
      q_t_selector: next-state Q-values that choose it, ``(num_actions,)``.

    Returns:
      The TD error, a scalar.
    """
    chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector], [1, 0, 0, 0, 1, 1])
    chex.assert_type([a_tm1], int)
    chex.assert_equal_shape([q_tm1, q_t_value, q_t_selector])
    target = r_t + discount_t * q_t_value[jnp.argmax(q_t_selector)]
    return jax.lax.stop_gradient(target) - q_tm1[a_tm1]


def huber_loss(x: jax.Array, delta: float = 1.0) -> jax.Array:
    """Elementwise Huber loss (Huber 1964).

    ``0.5 * x**2`` where ``|x| <= delta``, and ``delta * (|x| - 0.5 * delta)``
    beyond. Its gradient is ``x`` clipped to ``[-delta, delta]``: minimising the
    Huber loss of a TD error is the "TD-error clipping" of Mnih et al. (2015).

    Args:
      x: any array, usually TD errors.
      delta: where the loss turns from quadratic to linear; positive and finite.

    Returns:
      An array of the shape of ``x``.
    """
    if isinstance(delta, (int, float)) and not 0.0 < delta < float("inf"):
        raise ValueError(
            f"huber_loss delta must be a positive finite number, got {delta} "
            f"(squared_loss is the limit as delta grows)"
        )
    return optax.losses.huber_loss(x, delta=delta)


def squared_loss(x: jax.Array) -> jax.Array:
    """Elementwise ``0.5 * x**2``, for comparison with :func:`huber_loss`."""
    return 0.5 * jnp.square(x)
