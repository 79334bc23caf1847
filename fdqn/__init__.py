"""fdqn: DQN as pure, jit-compiled JAX functions over Keras 3 models."""

from fdqn import _backend
from fdqn._backend import KerasBackendError, configure_malloc, configure_xla, ensure_jax_backend

ensure_jax_backend()
configure_xla()
_backend.malloc_applied = configure_malloc()

# Imports below need Keras' JAX backend, selected above.
from fdqn.exploration import (  # noqa: E402
    epsilon_greedy,
    exponential_epsilon,
    linear_epsilon,
    select_actions,
)
from fdqn.learner import (  # noqa: E402
    TrainState,
    clip_by_tensor_norm,
    create_train_state,
    dqn_loss,
    make_optimizer,
    sync_target,
    update,
)
from fdqn.networks import (  # noqa: E402
    SpaceToDepthConv2D,
    mlp,
    nature_cnn,
    notebook_cnn,
    pure_q_fn,
    seed_initializers,
    write_params,
)
from fdqn.replay import Batch, ReplayMemory  # noqa: E402
from fdqn.rollout import Rollout  # noqa: E402
from fdqn.value_learning import (  # noqa: E402
    double_q_learning,
    huber_loss,
    q_learning,
    squared_loss,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "KerasBackendError",
    "ReplayMemory",
    "Rollout",
    "TrainState",
    "clip_by_tensor_norm",
    "create_train_state",
    "double_q_learning",
    "dqn_loss",
    "epsilon_greedy",
    "exponential_epsilon",
    "huber_loss",
    "linear_epsilon",
    "make_optimizer",
    "mlp",
    "nature_cnn",
    "SpaceToDepthConv2D",
    "notebook_cnn",
    "pure_q_fn",
    "seed_initializers",
    "q_learning",
    "select_actions",
    "squared_loss",
    "sync_target",
    "update",
    "write_params",
]
