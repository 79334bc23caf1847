"""Does a large ``np.zeros`` take RAM at once under fdqn's malloc settings? Against glibc's.

With fdqn's settings (``fdqn.cpu.MALLOC_SETTINGS``: no mmap for large
blocks) a large ``np.zeros`` (a ``calloc``) comes from the heap, and glibc
clears such a block itself, writing every page, unless it can tell the memory
is fresh from the kernel. On glibc's defaults the block gets its own mapping,
whose pages the kernel maps only when they are first written. Which case a
process hits depends on what it freed before, so this starts the CleanRL-style
worker of ``benchmarks/compare.py`` (which allocates two numpy buffers of
100,000 Atari observations, 2.8 GB each, after building its env and network)
many times under each setting, alternating, and reads its peak RSS before it
takes a step.
The last line of output is one JSON object.

    python benchmarks/zeros_residency.py [--starts 12]
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = json.dumps(
    {"kind": "nature", "params": {"warmup": 0, "quick_warmup": 0}, "impl": "cleanrl_style"}
)
# a buffer of 100,000 observations is 2,692 MiB: above this, at least one was written out whole
COMMITTED_MB = 2_000


def peak_rss_mb(malloc: str) -> float:
    """A fresh CleanRL-style worker's peak RSS once it has built its env, network and buffers."""
    env = dict(os.environ, FDQN_MALLOC=malloc)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "compare.py"), "--worker", SPEC],
        input='{"cmd": "rss"}\n',
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=12, help="worker starts per setting")
    args = parser.parse_args()
    rss = {"tuned": [], "system": []}
    for _ in range(args.starts):
        for malloc in rss:
            rss[malloc].append(peak_rss_mb(malloc))
    for malloc, values in rss.items():
        committed = sum(v > COMMITTED_MB for v in values)
        print(
            f"FDQN_MALLOC={malloc:6}: peak RSS {min(values):,.0f} to {max(values):,.0f} MB; "
            f"a buffer written out whole in {committed} of {len(values)} starts"
        )
    print(json.dumps({"committed_above_mb": COMMITTED_MB, "peak_rss_mb": rss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
