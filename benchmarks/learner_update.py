"""Time of one ``fdqn.update`` under different XLA:CPU flags, malloc settings and dtype policies.

Two configurations: the Nature CNN with batch 32 and Adam, and the notebook's
network with batch 64 and RMSProp. XLA reads its flags once per process, and
malloc settings are process-wide, so each variant runs in its own subprocess;
the subprocesses alternate, the order rotating from round to round, so that
machine drift hits all of them. Each times ``--updates`` updates after a
warm-up (compilation excluded) and counts the page faults they take. Medians
of the per-round means are reported, and for fdqn's own settings the
per-round ratios to glibc's malloc defaults (``FDQN_MALLOC=system``) and to
bfloat16 compute (the networks' ``dtype_policy="mixed_bfloat16"``). The last
line of output is one JSON object.

    python benchmarks/learner_update.py [--rounds 3] [--updates 30] [--variants NAME ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

FDQN_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
# name: (XLA_FLAGS, FDQN_MALLOC, the networks' dtype policy)
VARIANTS = {
    "default": ("", "tuned", "float32"),  # jaxlib 0.10: convolutions and dots in YNNPACK
    "ynn_dot": ("--xla_cpu_experimental_ynn_fusion_type=dot", "tuned", "float32"),
    "ynn_each_dot": (FDQN_FLAGS, "tuned", "float32"),  # fdqn on CPU
    "no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", "tuned", "float32"),
    "system_malloc": (FDQN_FLAGS, "system", "float32"),  # glibc's malloc defaults
    "mixed_bf16": (FDQN_FLAGS, "tuned", "mixed_bfloat16"),  # bfloat16 layers
    # XLA's oneDNN options on top of fdqn's flags; with jaxlib 0.10.2 the compiled updates
    # hold no oneDNN call under them (the convolutions stay XLA's, the dots YNNPACK's)
    "onednn": (
        FDQN_FLAGS + " --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
        "tuned",
        "float32",
    ),
}
# (variant, the variant it is compared with round by round)
PAIRS = (("ynn_each_dot", "system_malloc"), ("mixed_bf16", "ynn_each_dot"))

WORKER = r"""
import json, os, resource, sys, time
import fdqn, fdqn.cpu

fdqn.cpu.tune(malloc=os.environ["FDQN_MALLOC"] == "tuned")  # XLA_FLAGS is the variant's
import jax, numpy as np

name, updates, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# the same weights under every flag set: the losses are comparable
if name == "nature":
    model = fdqn.nature_cnn(4, dtype_policy=policy, seed=0)
    batch, opt = 32, fdqn.make_optimizer("adam", 1e-4)
else:
    model, batch = fdqn.notebook_cnn(4, dtype_policy=policy, seed=0), 64
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
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for _ in range(updates):
    state, m = fdqn.update(state, data)
jax.block_until_ready(state)
ms = (time.perf_counter() - start) / updates * 1000
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / updates
print(json.dumps({"ms": ms, "compile_s": compile_s, "loss": float(m["loss"]), "faults": faults}))
"""


def run(config: str, variant: str, updates: int) -> dict:
    flags, malloc, policy = VARIANTS[variant]
    env = dict(os.environ)
    env["XLA_FLAGS"] = flags  # even "" (XLA's defaults): fdqn.cpu.tune leaves a set one alone
    env["FDQN_MALLOC"] = malloc
    out = subprocess.run(
        [sys.executable, "-c", WORKER, config, str(updates), policy],
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
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME"
    )
    args = parser.parse_args()
    results = {}
    names = list(dict.fromkeys(args.variants))
    for config in ("nature", "notebook"):
        runs = {name: [] for name in names}
        for i in range(args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                runs[name].append(run(config, name, args.updates))
        results[config] = {
            name: {
                "ms_per_update": statistics.median(r["ms"] for r in runs[name]),
                "compile_s": statistics.median(r["compile_s"] for r in runs[name]),
                "page_faults_per_update": statistics.median(r["faults"] for r in runs[name]),
                "loss_after_34_updates": runs[name][-1]["loss"],
            }
            for name in names
        }
        base_name = names[0]
        base = results[config][base_name]["ms_per_update"]
        for name in names:
            r = results[config][name]
            print(
                f"{config:>8} {name:>13}: {r['ms_per_update']:6.1f} ms/update "
                f"(x{r['ms_per_update'] / base:.2f} of {base_name}), "
                f"{r['page_faults_per_update']:6.0f} page faults/update, "
                f"compile {r['compile_s']:.1f} s, loss {r['loss_after_34_updates']:.6g}"
            )
        for a, b in PAIRS:
            if a in runs and b in runs:
                ratios = [x["ms"] / y["ms"] for x, y in zip(runs[a], runs[b])]
                results[config][f"{a}_over_{b}_rounds"] = ratios
                print(
                    f"{config:>8} {a} / {b} per round: "
                    + " ".join(f"{x:.2f}" for x in ratios)
                    + f" (median {statistics.median(ratios):.2f})"
                )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
