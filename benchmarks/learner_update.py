"""Time of one ``fdqn.update`` under different XLA:CPU flags, side by side.

Two configurations: the Nature CNN with batch 32 and Adam, and the notebook's
network with batch 64 and RMSProp. XLA reads its flags once per process, so
each flag set runs in its own subprocess; the subprocesses alternate
(A B A B ...) so that machine drift hits all of them, each times
``--updates`` updates after a warm-up (compilation excluded), and medians of
the per-round means are reported. The last line of output is one JSON object.

    python benchmarks/learner_update.py [--rounds 3] [--updates 30]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

FLAG_SETS = {
    "default": "",  # jaxlib 0.10: convolutions and dots in YNNPACK
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_each_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",  # fdqn on CPU
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",  # fdqn on CPU before
}

WORKER = r"""
import json, sys, time
import jax, numpy as np
import fdqn

name, updates = sys.argv[1], int(sys.argv[2])
fdqn.seed_initializers(0)  # the same weights under every flag set: the losses are comparable
if name == "nature":
    model, batch, opt = fdqn.nature_cnn(4), 32, fdqn.make_optimizer("adam", 1e-4)
else:
    model, batch = fdqn.notebook_cnn(4), 64
    opt = fdqn.make_optimizer("rmsprop", 1e-3, clip="per_tensor", max_grad_norm=1.0)
state = fdqn.create_train_state(model, opt, jax.random.key(0))
rng = np.random.default_rng(0)
data = fdqn.Batch(
    obs=rng.integers(0, 256, (batch, 4, 84, 84), dtype=np.uint8),
    action=rng.integers(0, 4, batch),
    reward=rng.normal(size=batch).astype(np.float32),
    next_obs=rng.integers(0, 256, (batch, 4, 84, 84), dtype=np.uint8),
    terminated=rng.random(batch) < 0.1,
)
start = time.perf_counter()
state, m = fdqn.update(state, data)
jax.block_until_ready(state)
compile_s = time.perf_counter() - start
for _ in range(3):
    state, m = fdqn.update(state, data)
jax.block_until_ready(state)
start = time.perf_counter()
for _ in range(updates):
    state, m = fdqn.update(state, data)
jax.block_until_ready(state)
ms = (time.perf_counter() - start) / updates * 1000
print(json.dumps({"ms": ms, "compile_s": compile_s, "loss": float(m["loss"])}))
"""


def run(config: str, flags: str, updates: int) -> dict:
    env = dict(os.environ)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env["XLA_FLAGS"] = ""  # XLA's defaults: fdqn leaves a set XLA_FLAGS alone
    out = subprocess.run(
        [sys.executable, "-c", WORKER, config, str(updates)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=30)
    args = parser.parse_args()
    results = {}
    for config in ("nature", "notebook"):
        times = {name: [] for name in FLAG_SETS}
        compiles = {name: [] for name in FLAG_SETS}
        losses = {}
        for _ in range(args.rounds):
            for name, flags in FLAG_SETS.items():
                r = run(config, flags, args.updates)
                times[name].append(r["ms"])
                compiles[name].append(r["compile_s"])
                losses[name] = r["loss"]
        results[config] = {
            name: {
                "ms_per_update": statistics.median(times[name]),
                "compile_s": statistics.median(compiles[name]),
                "loss_after_34_updates": losses[name],
            }
            for name in FLAG_SETS
        }
        base = results[config]["default"]["ms_per_update"]
        for name in FLAG_SETS:
            r = results[config][name]
            print(
                f"{config:>8} {name:>12}: {r['ms_per_update']:6.1f} ms/update "
                f"(x{r['ms_per_update'] / base:.2f} of default), compile {r['compile_s']:.1f} s, "
                f"loss {r['loss_after_34_updates']:.6g}"
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
