"""fdqn against the TF 2 port of the notebook, side by side on one machine.

    python benchmarks/compare.py [--quick] [--rounds R] [--only CASE ...] [--out FILE]

``--quick`` (under 5 minutes here) is a smoke check: 2 rounds of shorter blocks after
shorter warm-ups, without the runs under XLA's default flags.

Implementations: ``fdqn``; ``fdqn_xla_default``, fdqn with XLA's default
flags instead of the ones fdqn sets on CPU (``XLA_FLAGS=""``); ``tf_eager``,
the notebook's eager GradientTape update (benchmarks/tf_notebook.py);
``tf_function``, the same update inside ``tf.function``. Cases:

- ``update/notebook``: one learner update, the notebook's network, batch 64,
  RMSProp 1e-3, per-tensor clipping at 1, summed loss (its faithful mode);
- ``update/nature``: the Nature CNN, batch 32, Adam 1e-4, global clipping at
  10, mean loss with terminal masking;
- ``act/notebook-1``, ``act/nature-8``: greedy actions for a batch of 1 or 8
  observations, from uint8 pixels to actions on the host;
- ``e2e/breakout``: the notebook's training loop on Breakout (one env, an
  update every agent step from the first 64 transitions, faithful mode), in
  agent steps per second after learning has started; fdqn runs its
  ``notebook`` preset through ``fdqn.train.run_until``;
- ``e2e/cartpole``: the same loop on CartPole-v1 with a 64-64 ReLU MLP;
- ``e2e/breakout-nature``: the Nature recipe (fdqn's default preset, 8 envs,
  an update every 4 agent steps) against the same recipe in a loop written
  the way CleanRL writes its JAX DQN (one env, a device round trip per step).

PyTorch, when installed (``pip install -e ".[torch]"``), runs the Nature-network
cases too.

fdqn's workers apply fdqn.cpu.tune() (its XLA flag and glibc malloc options)
that keep freed memory mapped for reuse. They speed TF's updates as well, so by
default the TF and PyTorch workers get the same settings through glibc's
environment variables; ``--baseline-malloc system`` runs them on glibc's defaults
instead, as those frameworks run unless told.

Each implementation of a case runs in its own worker process (the parity of
the numbers is tested in tests/test_tf_parity.py). A worker builds and warms
up first; that time (jit compilation, TF tracing, the first 64 steps of a
loop) is reported apart as ``setup_s``. Then the workers take turns, A B C A
B C ..., each timing one block per round, so machine drift hits all of them;
the table shows medians over rounds. Peak RSS is each worker's VmHWM.

The last line of output is one JSON object with every figure.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TF_IMPLS = ("fdqn", "fdqn_xla_default", "tf_eager", "tf_function")
# PyTorch (the optional ``torch`` extra) joins the Nature-network cases when it is installed.
TORCH_IMPLS = TF_IMPLS + (("torch",) if importlib.util.find_spec("torch") else ())
NATURE_IMPLS = ("fdqn", "fdqn_xla_default", "cleanrl_style", "cleanrl_style_xla_default")

# case -> (kind, parameters, implementations, units per block in full mode, in quick mode)
CASES = {
    "update/notebook": ("update", {"config": "notebook"}, TF_IMPLS, 20, 8),
    "update/nature": ("update", {"config": "nature"}, TORCH_IMPLS, 30, 10),
    "act/notebook-1": ("act", {"network": "notebook", "n": 1}, TF_IMPLS, 200, 50),
    "act/nature-8": ("act", {"network": "nature", "n": 8}, TORCH_IMPLS, 200, 50),
    "e2e/breakout": (
        "e2e",
        {"env": "BreakoutNoFrameskip-v4", "warmup": 64 + 36, "quick_warmup": 64 + 8},
        TF_IMPLS,
        60,
        20,
    ),
    "e2e/cartpole": (
        "e2e",
        {"env": "CartPole-v1", "warmup": 64 + 236, "quick_warmup": 64 + 100},
        TF_IMPLS,
        300,
        100,
    ),
    "e2e/breakout-nature": (
        "nature",
        {"warmup": 2_000 + 400, "quick_warmup": 2_000 + 80},
        NATURE_IMPLS,
        400,
        160,
    ),
}
UNITS = {"update": "ms/update", "act": "ms/call", "e2e": "steps/s", "nature": "steps/s"}


# -- workers --------------------------------------------------------------------


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _random_batch(size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return dict(
        obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        action=rng.integers(0, 4, size),
        reward=rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), size),
        next_obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        terminated=rng.random(size) < 0.05,
    )


def _tf_arrays(b):
    import numpy as np

    return (
        np.transpose(b["obs"], (0, 2, 3, 1)).astype(np.float32),
        b["action"].astype(np.int64),
        b["reward"],
        np.transpose(b["next_obs"], (0, 2, 3, 1)).astype(np.float32),
        b["terminated"].astype(np.float32),
    )


class FdqnWorker:
    def __init__(self, kind, params):
        import fdqn.cpu

        # what fdqn.train does on a CPU; XLA_FLAGS="" workers keep XLA's defaults, and
        # FDQN_MALLOC=system (benchmarks/zeros_residency.py) glibc's malloc
        fdqn.cpu.tune(malloc=os.environ.get("FDQN_MALLOC", "tuned") == "tuned")
        import jax

        import fdqn

        self.kind, self.params, self.fdqn, self.jax = kind, params, fdqn, jax

    def setup(self):
        fdqn, jax = self.fdqn, self.jax
        if self.kind == "update":
            if self.params["config"] == "notebook":
                model, size = fdqn.notebook_cnn(4, scale_obs=False), 64
                opt = fdqn.make_optimizer("rmsprop", 1e-3, clip="per_tensor", max_grad_norm=1.0)
                self.kwargs = dict(reduction="sum", mask_terminal=False)
            else:
                model, size = fdqn.nature_cnn(4), 32
                opt = fdqn.make_optimizer("adam", 1e-4, clip="global", max_grad_norm=10.0)
                self.kwargs = dict(reduction="mean", mask_terminal=True)
            self.state = fdqn.create_train_state(model, opt, jax.random.key(0))
            self.batches = [fdqn.Batch(**_random_batch(size, seed)) for seed in range(4)]
            self.run(1)
            self.run(3)
        elif self.kind == "act":
            n = self.params["n"]
            model = (
                fdqn.notebook_cnn if self.params["network"] == "notebook" else fdqn.nature_cnn
            )(4)
            self.q_fn, self.net_params = fdqn.pure_q_fn(model)
            self.obs = _random_batch(n, 0)["obs"]
            self.key = jax.random.key(0)
            self.run(5)
        else:
            import io
            import tempfile

            from fdqn import reporting, train
            from fdqn.config import preset

            if self.kind == "nature":
                config = preset("atari")
                config = config.replace(
                    **NATURE_BENCH,
                    exploration_fraction=NATURE_BENCH["learning_starts"] / config.total_steps,
                    eval_every=0,
                    checkpoint_every=0,
                    log_every=10**9,
                )
            else:
                config = preset("notebook").replace(
                    mask_terminal=False,
                    loss_reduction="sum",
                    total_episodes=0,
                    total_steps=10**9,
                    log_every=10**9,
                    print_episodes=False,
                )
            if self.kind == "e2e" and self.params["env"] != "BreakoutNoFrameskip-v4":
                config = config.replace(
                    env=self.params["env"],
                    network="mlp",
                    hidden=(64, 64),
                    terminal_on_life_loss=False,
                )
            config.validate()
            self.train = train
            self.run_dir = tempfile.mkdtemp(prefix="fdqn-compare-")
            self.runner = train.build(config)
            self.reporter = reporting.Reporter(
                self.run_dir, config.total_steps, config.log_every, io.StringIO()
            )
            self.schedule = train.epsilon_schedule(config)
            self.run(self.params["warmup"])

    def run(self, n):
        jax = self.jax
        if self.kind == "update":
            for i in range(n):
                self.state, metrics = self.fdqn.update(
                    self.state, self.batches[i % len(self.batches)], **self.kwargs
                )
            jax.block_until_ready((self.state, metrics))
        elif self.kind == "act":
            import numpy as np

            for _ in range(n):
                np.asarray(
                    self.fdqn.select_actions(self.q_fn, self.net_params, self.key, self.obs, 0.0)
                )
        else:
            limit = self.runner.rollout.agent_steps + n
            self.train.run_until(self.runner, self.run_dir, self.reporter, self.schedule, limit)
            jax.block_until_ready(self.runner.state)


class TfWorker:
    def __init__(self, kind, params, compiled):
        sys.path.insert(0, HERE)
        import tf_notebook

        self.kind, self.params, self.compiled, self.tfn = kind, params, compiled, tf_notebook

    def setup(self):
        tfn = self.tfn
        if self.kind == "update":
            config = self.params["config"]
            size = 64 if config == "notebook" else 32
            self.learner = tfn.make_learner(
                config, (84, 84, 4), 4, config=config, compiled=self.compiled
            )
            self.batches = [_tf_arrays(_random_batch(size, seed)) for seed in range(4)]
            self.run(1)
            self.run(3)
        elif self.kind == "act":
            import numpy as np

            self.learner = tfn.make_learner(
                self.params["network"], (84, 84, 4), 4, compiled=self.compiled
            )
            obs = _random_batch(self.params["n"], 0)["obs"]
            self.obs = np.ascontiguousarray(np.transpose(obs, (0, 2, 3, 1)))
            self.run(5)
        else:
            self.loop = tfn.NotebookLoop(self.params["env"], compiled=self.compiled, seed=0)
            self.run(self.params["warmup"])

    def run(self, n):
        import numpy as np

        tf = self.tfn.tf
        if self.kind == "update":
            for i in range(n):
                loss = self.learner.update(*self.batches[i % len(self.batches)])
            loss.numpy()
        elif self.kind == "act":
            for _ in range(n):
                obs = self.obs.astype(np.float32)
                if self.compiled:
                    self.learner.greedy_actions(obs)
                else:  # the notebook's way
                    tf.argmax(self.learner.policy_model(tf.convert_to_tensor(obs)), axis=1).numpy()
        else:
            self.loop.advance(n)


class TorchWorker:
    """The Nature CNN update and action selection in PyTorch (CPU), written plainly.

    Same architecture (channels-first uint8 in, scaled inside), Huber loss
    (``smooth_l1_loss``, delta 1, mean), terminal masking, global-norm
    clipping at 10, Adam 1e-4: the ``update/nature`` config.
    """

    def __init__(self, kind, params):
        import torch

        self.torch, self.kind, self.params = torch, kind, params

    def _net(self):
        nn = self.torch.nn
        return nn.Sequential(
            nn.Conv2d(4, 32, 8, 4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, 4),
        )

    def setup(self):
        torch = self.torch
        torch.manual_seed(0)
        self.net, self.target = self._net(), self._net()
        self.target.load_state_dict(self.net.state_dict())
        if self.kind == "update":
            self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
            self.batches = [_random_batch(32, seed) for seed in range(4)]
            self.run(4)
        else:
            self.obs = _random_batch(self.params["n"], 0)["obs"]
            self.run(5)

    def _q(self, net, obs):
        return net(self.torch.from_numpy(obs).float() / 255.0)

    def run(self, n):
        torch = self.torch
        F = torch.nn.functional
        if self.kind == "act":
            with torch.no_grad():
                for _ in range(n):
                    self._q(self.net, self.obs).argmax(dim=1).numpy()
            return
        for i in range(n):
            b = self.batches[i % len(self.batches)]
            action = torch.from_numpy(b["action"]).long()
            reward = torch.from_numpy(b["reward"])
            done = torch.from_numpy(b["terminated"]).float()
            with torch.no_grad():
                target = reward + 0.99 * (1 - done) * self._q(self.target, b["next_obs"]).max(1)[0]
            q = self._q(self.net, b["obs"]).gather(1, action[:, None]).squeeze(1)
            loss = F.smooth_l1_loss(q, target)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
            self.opt.step()
        loss.item()


# The Nature recipe as fdqn's default preset runs it (8 envs), with a smaller
# buffer and learning from 2,000 agent steps so the benchmark reaches the
# steady state (epsilon at its final 0.01) in seconds.
NATURE_BENCH = dict(buffer_size=100_000, learning_starts=2_000)


class CleanRLStyleWorker:
    """The Nature recipe in a loop written the way CleanRL's ``dqn_atari_jax.py`` is.

    One environment; a host numpy replay buffer of ``(obs, next_obs)`` pairs;
    a jitted forward pass and an argmax fetched to the host every step
    (``jax.device_get``); epsilon-greedy with Python's ``random``; a jitted
    update every 4 agent steps on a batch of 32, a target copy every 1,000.
    It uses fdqn's env, network and ``update``, so only the loop differs;
    ``cleanrl_style_xla_default`` runs it with XLA's default flags, as
    CleanRL's own script would run.
    """

    def __init__(self, kind, params):
        import random

        import fdqn.cpu

        fdqn.cpu.tune(malloc=os.environ.get("FDQN_MALLOC", "tuned") == "tuned")
        import jax
        import numpy as np

        import fdqn
        from fdqn import envs

        self.jax, self.np, self.fdqn, self.random = jax, np, fdqn, random
        self.params = params
        random.seed(0)
        self.env = envs.make("BreakoutNoFrameskip-v4", 1)
        self.num_actions = int(self.env.single_action_space.n)
        model = fdqn.nature_cnn(self.num_actions, seed=0)
        opt = fdqn.make_optimizer("adam", 1e-4, clip="global", max_grad_norm=10.0)
        self.state = fdqn.create_train_state(model, opt, jax.random.key(0))
        self.q_apply = jax.jit(self.state.q_fn)
        size = NATURE_BENCH["buffer_size"]
        self.buffer = dict(
            obs=np.zeros((size, 4, 84, 84), np.uint8),
            next_obs=np.zeros((size, 4, 84, 84), np.uint8),
            action=np.zeros(size, np.int32),
            reward=np.zeros(size, np.float32),
            terminated=np.zeros(size, bool),
        )
        self.pos, self.size, self.global_step = 0, 0, 0
        self.rng = np.random.default_rng(0)
        self.obs, _ = self.env.reset(seed=0)
        self.resetting = False

    def setup(self):
        self.run(self.params["warmup"])

    def run(self, n):
        jax, np, fdqn, random = self.jax, self.np, self.fdqn, self.random
        starts = NATURE_BENCH["learning_starts"]
        for _ in range(n):
            epsilon = max(0.01, 1.0 - 0.99 * self.global_step / starts)
            if random.random() < epsilon:
                actions = np.array([random.randrange(self.num_actions)])
            else:
                q_values = self.q_apply(self.state.params, self.obs)
                actions = jax.device_get(q_values.argmax(axis=-1))
            next_obs, rewards, terminated, truncated, info = self.env.step(actions)
            if not self.resetting:  # the step after a game over only resets the env
                b, i = self.buffer, self.pos
                b["obs"][i], b["next_obs"][i] = self.obs[0], next_obs[0]
                b["action"][i], b["reward"][i] = actions[0], rewards[0]
                b["terminated"][i] = terminated[0] or info["life_lost"][0]
                self.pos = (i + 1) % len(b["action"])
                self.size = min(self.size + 1, len(b["action"]))
            self.resetting = bool(terminated[0] or truncated[0])
            self.obs = next_obs
            self.global_step += 1
            if self.global_step > starts:
                if self.global_step % 4 == 0:
                    idx = self.rng.integers(0, self.size, 32)
                    batch = fdqn.Batch(**{k: v[idx] for k, v in self.buffer.items()})
                    self.state, metrics = fdqn.update(self.state, batch)
                if self.global_step % 1_000 == 0:
                    self.state = fdqn.sync_target(self.state)
        jax.block_until_ready(self.state)


def reply_channel():
    """The worker's line to the driver: stdout, which from here on carries nothing else.

    Anything libraries print goes to stderr instead; call this before importing them.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return replies


def serve(replies, setup, run) -> int:
    """Answers setup / run / rss commands, one JSON line each, from stdin on ``replies``.

    ``setup()`` builds and warms up (its time is reported as ``setup_s``);
    ``run(command)`` does one timed block (``seconds``); ``rss`` reports the
    peak resident memory.
    """
    for line in sys.stdin:
        command = json.loads(line)
        start = time.perf_counter()
        if command["cmd"] == "setup":
            setup()
            reply = {"setup_s": time.perf_counter() - start}
        elif command["cmd"] == "run":
            run(command)
            reply = {"seconds": time.perf_counter() - start}
        else:
            reply = {"peak_rss_mb": _peak_rss_mb()}
        replies.write(json.dumps(reply) + "\n")
    return 0


def worker_main(spec: str) -> int:
    """Serves one implementation of one case to the driver (:func:`serve`)."""
    replies = reply_channel()
    spec = json.loads(spec)
    kind, params, impl = spec["kind"], spec["params"], spec["impl"]
    if impl.startswith("fdqn"):
        worker = FdqnWorker(kind, params)
    elif impl.startswith("cleanrl_style"):
        worker = CleanRLStyleWorker(kind, params)
    elif impl == "torch":
        worker = TorchWorker(kind, params)
    else:
        worker = TfWorker(kind, params, compiled=impl == "tf_function")
    return serve(replies, worker.setup, lambda command: worker.run(command["n"]))


# -- the driver -----------------------------------------------------------------


# Implementations whose updates run outside fdqn: they get fdqn's glibc malloc
# settings (fdqn.cpu.MALLOC_SETTINGS) only as --baseline-malloc says.
BASELINE_IMPLS = ("tf_eager", "tf_function", "torch")


class Worker:
    """A worker process, ``script --worker SPEC``, asked one JSON command at a time."""

    # the baselines' malloc: "tuned" (fdqn's settings, through glibc's environment
    # variables) or "system" (glibc's defaults); set by main() from --baseline-malloc
    baseline_malloc = "tuned"
    script = os.path.abspath(__file__)  # whose worker_main serves the commands

    def __init__(self, kind, params, impl):
        spec = json.dumps({"kind": kind, "params": params, "impl": impl})
        self.impl = impl
        env = dict(os.environ)
        if impl.endswith("_xla_default"):
            env["XLA_FLAGS"] = ""  # fdqn leaves a user's XLA_FLAGS alone, even an empty one
        if impl in BASELINE_IMPLS and self.baseline_malloc == "tuned":
            from fdqn import cpu

            env.update(cpu.MALLOC_SETTINGS_ENV)  # what fdqn's own workers get from cpu.tune()
        self.proc = subprocess.Popen(
            [sys.executable, self.script, "--worker", spec],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def ask(self, **command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            err = self.proc.stderr.read().strip().splitlines()
            raise RuntimeError(f"{self.impl} worker failed: {err[-1] if err else 'no output'}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stderr.close()


def measure(case: str, rounds: int, quick: bool, log) -> dict:
    kind, params, impls, full_n, quick_n = CASES[case]
    n = quick_n if quick else full_n
    if quick:  # a smoke check: shorter warm-ups, no runs with XLA's default flags
        params = dict(params, warmup=params.get("quick_warmup", params.get("warmup")))
        impls = tuple(i for i in impls if not i.endswith("_xla_default"))
    workers = [Worker(kind, params, impl) for impl in impls]
    result = {}
    try:
        for w in workers:
            result[w.impl] = {"setup_s": w.ask(cmd="setup")["setup_s"], "blocks": []}
        for r in range(rounds):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for w in order:
                result[w.impl]["blocks"].append(w.ask(cmd="run", n=n)["seconds"])
        for w in workers:
            result[w.impl]["peak_rss_mb"] = w.ask(cmd="rss")["peak_rss_mb"]
    finally:
        for w in workers:
            w.close()
    for r in result.values():
        per_unit = [s / n for s in r["blocks"]]
        r["value"] = (
            statistics.median([1.0 / p for p in per_unit])
            if UNITS[kind] == "steps/s"
            else statistics.median(per_unit) * 1000
        )
        r["units_per_block"] = n
    log(_format_case(case, kind, result))
    return result


def _speedup(kind, fdqn_value, base_value):
    """How many times faster fdqn is than a baseline (> 1: fdqn wins)."""
    return fdqn_value / base_value if UNITS[kind] == "steps/s" else base_value / fdqn_value


HEADER = (
    f"{'case':20} {'unit':9}  {'implementation':16} {'median':>9}  {'fdqn speed-up':>13}  "
    f"{'setup s':>7}  {'peak RSS MB':>11}"
)


def _format_case(case, kind, result):
    f = result["fdqn"]["value"]
    lines = []
    for i, (impl, r) in enumerate(result.items()):
        ratio = "" if impl == "fdqn" else f"x{_speedup(kind, f, r['value']):.2f}"
        left = f"{case:20} {UNITS[kind]:9}" if i == 0 else " " * 30
        lines.append(
            f"{left}  {impl:16} {r['value']:9.2f}  {ratio:>13}  {r['setup_s']:7.1f}  "
            f"{r['peak_rss_mb']:11.0f}"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    import importlib.metadata

    found = []
    for name in ("jax", "jaxlib", "keras", "tensorflow", "tf-keras", "ale-py"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    flags = os.environ.get("XLA_FLAGS")
    return ", ".join(found) + (f"; XLA_FLAGS={flags!r}" if flags is not None else "")


def machine_line(title: str) -> str:
    """``title``, then the CPU count and model, the Python version and the time."""
    import platform

    return (
        f"{title}; {os.cpu_count()} CPUs, {_cpu_model()}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )


def recorder():
    """``(log, lines)``: ``log(text)`` prints a line at once and keeps it in ``lines``."""
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    return log, lines


def finish(lines: list[str], summary: dict, out: str | None) -> None:
    """Prints ``summary`` as the last line, one JSON object; with ``out``, writes all to it."""
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n" + json.dumps(summary) + "\n")
    print(json.dumps(summary))


def _malloc_line(baseline: str) -> str:
    from fdqn import cpu

    ours = cpu.MALLOC_SETTINGS
    settings = ", ".join(f"{k}={v}" for k, v in ours.items())
    return f"malloc: fdqn's settings ({settings}) for fdqn; " + (
        "the same for TF and PyTorch" if baseline == "tuned" else "glibc's for TF and PyTorch"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small blocks, short warm-ups, 2 rounds, no XLA-default runs: < 5 min",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (5; quick 2)")
    parser.add_argument("--only", nargs="+", metavar="CASE", help=f"cases: {', '.join(CASES)}")
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument(
        "--baseline-malloc",
        choices=("tuned", "system"),
        default="tuned",
        help="glibc malloc settings of the TF and PyTorch workers: fdqn's (tuned, the default: "
        "they speed TF too) or glibc's defaults (system, as those frameworks run unless told)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    Worker.baseline_malloc = args.baseline_malloc
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1:
        parser.error(f"--rounds must be a positive integer, got {rounds}")
    cases = args.only or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; cases are {', '.join(CASES)}")

    log, lines = recorder()
    log(
        machine_line(
            f"fdqn vs the TF notebook: {'quick' if args.quick else 'full'} mode, {rounds} rounds, "
            "medians"
        )
    )
    log(_versions())
    log(_malloc_line(args.baseline_malloc))
    log(HEADER)
    start = time.perf_counter()
    results = {case: measure(case, rounds, args.quick, log) for case in cases}
    log(
        f"speed-ups are fdqn over the baseline (> 1: fdqn faster); "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    summary = {
        "mode": "quick" if args.quick else "full",
        "rounds": rounds,
        "cases": {
            case: {
                "unit": UNITS[CASES[case][0]],
                **{impl: {k: v for k, v in r.items()} for impl, r in res.items()},
                **{
                    f"speedup_vs_{base}": _speedup(
                        CASES[case][0], res["fdqn"]["value"], res[base]["value"]
                    )
                    for base in res
                    if base != "fdqn"
                },
            }
            for case, res in results.items()
        },
    }
    finish(lines, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
