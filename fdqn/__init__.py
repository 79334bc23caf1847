"""fdqn: DQN as pure, jit-compiled JAX functions over Keras 3 models.

Importing fdqn selects Keras' JAX backend and changes nothing else in the
process. CPU tuning is an explicit call: :func:`fdqn.cpu.tune`.
"""

from fdqn._backend import KerasBackendError, ensure_jax_backend

ensure_jax_backend()

# Imports below need Keras' JAX backend, selected above.
from fdqn.exploration import (  # noqa: E402
    epsilon_greedy,
    exponential_epsilon,
    linear_epsilon,
    select_actions,
)
from fdqn.learner import (  # noqa: E402
    Batch,
    TrainState,
    clip_by_tensor_norm,
    create_train_state,
    dqn_loss,
    make_optimizer,
    sync_target,
    update,
)
from fdqn.networks import (  # noqa: E402
    mlp,
    nature_cnn,
    notebook_cnn,
    pure_q_fn,
    write_params,
)
from fdqn.replay import ReplayMemory  # noqa: E402
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
    "notebook_cnn",
    "pure_q_fn",
    "q_learning",
    "select_actions",
    "squared_loss",
    "sync_target",
    "update",
    "write_params",
]
