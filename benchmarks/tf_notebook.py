"""The notebook's DQN in TensorFlow 2: the baseline fdqn is measured against.

A port of ``shared/seed/hackathon8-notebook.md`` that changes only what TF 2
no longer has:

- eager execution is the default (``tf.enable_eager_execution`` is gone);
- ``tf.train.RMSPropOptimizer`` becomes ``tf.keras.optimizers.RMSprop``
  (rho 0.9, epsilon 1e-7 inside the square root, no momentum: the settings
  fdqn's ``make_optimizer("rmsprop")`` uses);
- ``gym`` + Baselines' ``atari_wrappers`` become fdqn's Atari env, which has
  the same preprocessing (no-op starts, frame skip 4 with max-pooling, 84x84
  grayscale, a stack of 4, rewards clipped to their sign). wrap_deepmind
  ended an episode at each lost life; so does this loop.

Everything else is the notebook's: its list-of-namedtuples replay memory
sampled with ``random.sample``, its network (no activations, unscaled float
pixels), epsilon-greedy with its exponential decay, Huber loss under an eager
``GradientTape`` at every step, ``tf.clip_by_norm`` on each gradient, batch
64, an update every step from the first full batch, a target copy every 10
episodes. So are its bugs: the target bootstraps through terminal states
(``mask_terminal=True`` fixes that, the one flag the benchmark needs) and the
loss is summed over the batch (``tape.gradient`` of the per-transition
losses).

Two learners: ``compiled=False`` is the notebook's eager update;
``compiled=True`` puts the same update inside ``tf.function``, as a TF expert
would: the stronger baseline.

``tf.keras`` here is Keras 2 (the ``tf-keras`` package, selected with
``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported), so this module can
share a process with fdqn, whose Keras 3 runs on JAX. Install both with
``pip install -e ".[tf]"``. TensorFlow's oneDNN kernels are switched on
(``TF_ENABLE_ONEDNN_OPTS=1``, unless set otherwise), as a TF user tuning for
CPU would: on this machine they cut its update time by half or more.

    python benchmarks/tf_notebook.py [--env breakout|cartpole] [--episodes 20]
        [--compiled] [--mask-terminal]
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels: TF 2.21 leaves them off on this AMD CPU, and they more than
# halve its convolution time; the baseline gets them unless the user says otherwise.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if not tf.keras.__name__.startswith("tf_keras"):
    raise ImportError(
        "benchmarks/tf_notebook.py needs tf.keras to be Keras 2 (the tf-keras package) and "
        "TF_USE_LEGACY_KERAS=1 set before TensorFlow is first imported; "
        f"got {tf.keras.__name__}: pip install -e '.[tf]'"
    )

Transition = collections.namedtuple(
    "Transition", ("state", "action", "next_state", "reward", "terminated")
)

EPS_START = 1.0
EPS_END = 0.1
EPS_DECAY = 100_000


class ReplayMemory:
    """The notebook's replay memory: a list of transitions used as a ring."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.memory = []
        self.position = 0

    def push(self, *args):
        if len(self.memory) < self.capacity:
            self.memory.append(None)
        self.memory[self.position] = Transition(*args)
        self.position = (self.position + 1) % self.capacity

    def sample(self, batch_size):
        return random.sample(self.memory, batch_size)

    def __len__(self):
        return len(self.memory)


# -- networks (channels-last float input, as tf.keras takes images) -------------


def dqn_network(input_shape, action_num):
    """The notebook's network: three strided convolutions and a dense layer, no activations."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(16, 5, 2, input_shape=input_shape),
            tf.keras.layers.Conv2D(32, 5, 2),
            tf.keras.layers.Conv2D(32, 5, 2),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(action_num),
        ]
    )


def nature_network(input_shape, action_num):
    """The Nature CNN (Mnih et al. 2015) in tf.keras, pixels scaled to [0, 1] inside."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Rescaling(1.0 / 255.0, input_shape=input_shape),
            tf.keras.layers.Conv2D(32, 8, 4, activation="relu"),
            tf.keras.layers.Conv2D(64, 4, 2, activation="relu"),
            tf.keras.layers.Conv2D(64, 3, 1, activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(512, activation="relu"),
            tf.keras.layers.Dense(action_num),
        ]
    )


def mlp_network(obs_dim, action_num, hidden=(64, 64)):
    """A ReLU MLP for vector observations (CartPole)."""
    layers = [tf.keras.layers.InputLayer(input_shape=(obs_dim,))]
    layers += [tf.keras.layers.Dense(width, activation="relu") for width in hidden]
    return tf.keras.Sequential(layers + [tf.keras.layers.Dense(action_num)])


# -- acting and learning --------------------------------------------------------


def select_eps_greedy_action(policy_model, obs, step, num_actions):
    """The notebook's epsilon-greedy action for one observation batch of size 1."""
    eps_threshold = EPS_END + (EPS_START - EPS_END) * math.exp(-1.0 * step / EPS_DECAY)
    if random.random() > eps_threshold:  # exploit
        return int(tf.argmax(policy_model(tf.convert_to_tensor(obs)), axis=1)[0])
    return random.randrange(num_actions)


def huber_loss(x, delta=1.0):
    return tf.where(tf.abs(x) < delta, tf.square(x) * 0.5, delta * (tf.abs(x) - 0.5 * delta))


def batch_arrays(transitions):
    """The notebook's rearrangement of sampled transitions into float32 arrays."""
    batch = Transition(*zip(*transitions))
    return (
        np.array(batch.state, dtype=np.float32),
        np.array(batch.action, dtype=np.int64),
        np.array(batch.reward, dtype=np.float32),
        np.array(batch.next_state, dtype=np.float32),
        np.array(batch.terminated, dtype=np.float32),
    )


class Learner:
    """Policy and target networks, the optimizer and the TD update.

    Args:
      policy_model, target_model: two tf.keras models of the same shape.
      optimizer: a tf.keras optimizer.
      gamma: discount factor.
      clip: ``"per_tensor"`` (the notebook's ``tf.clip_by_norm`` of each
        gradient), ``"global"`` (``tf.clip_by_global_norm``) or ``"none"``.
      max_grad_norm: the clipping bound.
      reduction: ``"sum"`` (the notebook's) or ``"mean"`` over the batch.
      mask_terminal: no bootstrap after terminal transitions (the fix).
      compiled: run the update inside ``tf.function``.
    """

    def __init__(
        self,
        policy_model,
        target_model,
        optimizer,
        gamma=0.99,
        clip="per_tensor",
        max_grad_norm=1.0,
        reduction="sum",
        mask_terminal=False,
        compiled=False,
    ):
        if clip not in ("per_tensor", "global", "none"):
            raise ValueError(f"clip must be per_tensor, global or none, got {clip!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
        self.policy_model, self.target_model, self.optimizer = policy_model, target_model, optimizer
        self.gamma, self.clip, self.max_grad_norm = gamma, clip, max_grad_norm
        self.reduction, self.mask_terminal = reduction, mask_terminal
        self.compiled = compiled
        self._step = tf.function(self._update) if compiled else self._update
        self._act = tf.function(self._greedy) if compiled else self._greedy

    def loss_and_gradients(self, states, actions, rewards, next_states, terminated):
        """Loss, TD errors, Q-values and clipped gradients of one batch (the notebook's code)."""
        batch_size = tf.shape(actions)[0]
        with tf.GradientTape() as tape:
            # calculate value from taking action
            action_idxs = tf.stack(
                [tf.range(batch_size, dtype=tf.int64), tf.cast(actions, tf.int64)], axis=1
            )
            q_values = self.policy_model(states)
            state_action_values = tf.gather_nd(q_values, action_idxs)
            # calculate best value at next state
            next_state_values = tf.reduce_max(self.target_model(next_states), axis=1)
            if self.mask_terminal:
                next_state_values = next_state_values * (1.0 - terminated)
            # compute the expected Q values
            expected_state_action_values = (next_state_values * self.gamma) + rewards
            # compute Huber loss on TD-error
            td_error = state_action_values - expected_state_action_values
            losses = huber_loss(td_error)
            loss = tf.reduce_sum(losses) if self.reduction == "sum" else tf.reduce_mean(losses)
        gradients = tape.gradient(loss, self.policy_model.trainable_variables)
        if self.clip == "per_tensor":
            gradients = [tf.clip_by_norm(g, self.max_grad_norm) for g in gradients]
        elif self.clip == "global":
            gradients, _ = tf.clip_by_global_norm(gradients, self.max_grad_norm)
        return loss, td_error, q_values, gradients

    def _update(self, states, actions, rewards, next_states, terminated):
        loss, _, _, gradients = self.loss_and_gradients(
            states, actions, rewards, next_states, terminated
        )
        self.optimizer.apply_gradients(zip(gradients, self.policy_model.trainable_variables))
        return loss

    def update(self, states, actions, rewards, next_states, terminated):
        """One optimizer step on a batch of numpy arrays; returns the loss tensor."""
        return self._step(states, actions, rewards, next_states, terminated)

    def update_from_memory(self, replay_memory, batch_size):
        """The notebook's dqn_gradients + apply_gradients; None before a batch is stored."""
        if len(replay_memory) < batch_size:
            return None
        return self.update(*batch_arrays(replay_memory.sample(batch_size)))

    def _greedy(self, obs):
        return tf.argmax(self.policy_model(obs), axis=1)

    def greedy_actions(self, obs):
        """Greedy actions for a batch of observations, as a numpy array."""
        return self._act(tf.convert_to_tensor(obs)).numpy()

    def sync_target(self):
        self.target_model.set_weights(self.policy_model.get_weights())


def make_learner(network, obs_shape, num_actions, config="notebook", **overrides):
    """A learner with the notebook's settings or the Nature recipe's.

    ``network`` is ``"notebook"``, ``"nature"`` or ``"mlp"``; ``obs_shape`` is
    the tf.keras input shape (channels last). ``config="notebook"``: RMSProp
    1e-3, per-tensor clipping at 1, summed loss, no terminal masking.
    ``config="nature"``: Adam 1e-4, global clipping at 10, mean loss, masking.
    """
    build = {"notebook": dqn_network, "nature": nature_network}
    if network == "mlp":
        models = [mlp_network(obs_shape[0], num_actions) for _ in range(2)]
    elif network in build:
        models = [build[network](obs_shape, num_actions) for _ in range(2)]
    else:
        raise ValueError(f"network must be notebook, nature or mlp, got {network!r}")
    if config == "notebook":
        settings = dict(
            optimizer=tf.keras.optimizers.RMSprop(1e-3),
            clip="per_tensor",
            max_grad_norm=1.0,
            reduction="sum",
            mask_terminal=False,
        )
    elif config == "nature":
        settings = dict(
            optimizer=tf.keras.optimizers.Adam(1e-4),
            clip="global",
            max_grad_norm=10.0,
            reduction="mean",
            mask_terminal=True,
        )
    else:
        raise ValueError(f"config must be notebook or nature, got {config!r}")
    settings.update(overrides)
    models[1].set_weights(models[0].get_weights())
    return Learner(models[0], models[1], **settings)


# -- the training loop ----------------------------------------------------------

TARGET_UPDATE_STEP_FREQ = 10
BATCH_SIZE = 64
REPLAY_BUFFER_SIZE = 100_000


class NotebookLoop:
    """The notebook's training loop on fdqn's environments, resumable step by step.

    ``advance(n)`` plays ``n`` more agent steps (each with an update once 64
    transitions are stored); episodes end at a game's end, its time limit or a
    lost life, as with wrap_deepmind.

    Args:
      env_id: ``"BreakoutNoFrameskip-v4"`` or a gymnasium id such as ``"CartPole-v1"``.
      compiled: use the ``tf.function`` learner.
      mask_terminal: fix the notebook's terminal bootstrapping.
      seed: seeds the env, Python's ``random`` and TF.
      out: where "Episode ..." lines go (None: nowhere).
    """

    def __init__(self, env_id, compiled=False, mask_terminal=False, seed=0, out=None):
        from fdqn import envs  # imported late: fdqn selects Keras 3's JAX backend

        random.seed(seed)
        tf.random.set_seed(seed)
        self.atari = envs.is_atari(env_id)
        self.env = envs.make(env_id, 1)
        self.num_actions = int(self.env.single_action_space.n)
        obs_shape = self.env.single_observation_space.shape
        if self.atari:
            obs_shape = (*obs_shape[1:], obs_shape[0])  # (84, 84, 4) as wrap_deepmind gives
        self.learner = make_learner(
            "notebook" if self.atari else "mlp",
            obs_shape,
            self.num_actions,
            mask_terminal=mask_terminal,
            compiled=compiled,
        )
        self.memory = ReplayMemory(REPLAY_BUFFER_SIZE)
        self.out = out
        self.seed = seed
        self.step = 0
        self.episode = 0
        self.scores = []
        self._start_episode()

    def _env_step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(np.array([action]))
        done = terminated[0] or truncated[0] or info["life_lost"][0]
        return self._prep(obs[0]), float(reward[0]), bool(terminated[0]), bool(done)

    def _prep(self, obs):
        return np.transpose(obs, (1, 2, 0)) if self.atari else obs

    def _start_episode(self):
        # env.reset(): after a game over the vector env's next step starts a new game
        # (the action is ignored); after a lost life wrap_deepmind took a no-op step
        if self.step == 0:
            obs, _ = self.env.reset(seed=self.seed)
            self.prev_observation = self._prep(obs[0])
        else:
            self.prev_observation, _, _, _ = self._env_step(0)
        self.observation, _, _, _ = self._env_step(random.randrange(self.num_actions))
        self.ep_score = 0.0

    def advance(self, num_steps):
        """Plays ``num_steps`` agent steps; returns the scores of episodes that ended."""
        ended = []
        for _ in range(num_steps):
            # select and perform an action
            prepped_obs = np.expand_dims(np.array(self.observation, dtype=np.float32), axis=0)
            action = select_eps_greedy_action(
                self.learner.policy_model, prepped_obs, self.step, self.num_actions
            )
            self.observation, reward, terminated, done = self._env_step(action)
            # add to memory
            self.memory.push(self.prev_observation, action, self.observation, reward, terminated)
            self.prev_observation = self.observation
            # train model
            self.learner.update_from_memory(self.memory, BATCH_SIZE)
            self.ep_score += reward
            self.step += 1
            if done:
                # update the target network, copying all variables in DQN
                if self.episode % TARGET_UPDATE_STEP_FREQ == 0:
                    self.learner.sync_target()
                if self.out is not None:
                    print(
                        f"Episode {self.episode} achieved score {self.ep_score} "
                        f"at {self.step} training steps",
                        file=self.out,
                    )
                ended.append(self.ep_score)
                self.episode += 1
                self._start_episode()
        self.scores += ended
        return ended


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="breakout", help="breakout or a gymnasium id")
    parser.add_argument("--episodes", type=int, default=20, help="episodes to play")
    parser.add_argument("--compiled", action="store_true", help="update inside tf.function")
    parser.add_argument("--mask-terminal", action="store_true", help="fix terminal bootstrapping")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    env_id = "BreakoutNoFrameskip-v4" if args.env == "breakout" else args.env
    if args.episodes < 1:
        parser.error(f"--episodes must be a positive integer, got {args.episodes}")
    try:
        loop = NotebookLoop(env_id, args.compiled, args.mask_terminal, args.seed, out=sys.stdout)
    except ValueError as error:  # an unknown or unsupported env id
        parser.error(str(error))
    while loop.episode < args.episodes:
        loop.advance(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
