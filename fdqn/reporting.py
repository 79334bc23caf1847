"""What a training run shows and writes: progress, metrics CSV, TensorBoard, plot.

- On a terminal, one progress line redrawn in place: steps done / total,
  agent steps per second, ETA, mean score of the last 100 games, epsilon,
  loss. Elsewhere (CI, a pipe), a plain log line every ``log_every`` steps.
- ``metrics.csv``: a row per finished game (true score and length) with the
  learner's latest figures; ``eval.csv``: a row per evaluation.
- TensorBoard event files in ``tb/`` when ``tensorboardX`` is installed.
- ``learning_curve.png`` (matplotlib, when installed): scores against agent
  steps, smoothed, with evaluation results.
"""

import collections
import csv
import os
import sys
import time
from typing import Any, TextIO

import numpy as np

from fdqn.rundir import atomic_write

EPISODE_FIELDS = [
    "step", "episode", "score", "length", "epsilon", "loss", "q_taken", "grad_norm",
    "steps_per_second", "wall_time",
]  # fmt: skip
EVAL_FIELDS = ["step", "episodes", "mean", "median", "std", "min", "max"]


def _format_duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Reporter:
    """Writes a run's metrics and shows its progress.

    Args:
      run_dir: where ``metrics.csv``, ``eval.csv`` and ``tb/`` go.
      total_steps: the run's agent step budget, for the progress bar and ETA.
      log_every: agent steps between plain log lines (without a terminal).
      stream: where progress goes (stderr by default).
      start_step: agent steps already done (when resuming).
      learning_starts: the agent step from which updates run. Steps before it
        are much cheaper, so the ETA is estimated from the learning phase's
        own rate, and reads "ETA after learning starts" until then.
    """

    def __init__(
        self,
        run_dir: str,
        total_steps: int,
        log_every: int,
        stream: TextIO | None = None,
        start_step: int = 0,
        learning_starts: int = 0,
    ):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.scores: collections.deque = collections.deque(maxlen=100)
        self.learner: dict[str, float] = {}
        self._start_time = time.perf_counter()
        self._start_step = start_step
        self._rate_mark = (self._start_time, start_step)
        self._rate = 0.0
        self.learning_starts = learning_starts
        self._learning_mark: tuple[float, int] | None = None  # when learning was first seen
        self._last_draw = 0.0
        self._next_log = (start_step // log_every + 1) * log_every
        self._episodes = _CsvAppender(os.path.join(run_dir, "metrics.csv"), EPISODE_FIELDS)
        self._evals = _CsvAppender(os.path.join(run_dir, "eval.csv"), EVAL_FIELDS)
        self._tb = _tensorboard(os.path.join(run_dir, "tb"))

    def steps_per_second(self, step: int) -> float:
        now = time.perf_counter()
        then, then_step = self._rate_mark
        if now - then >= 2.0:
            self._rate = (step - then_step) / (now - then)
            self._rate_mark = (now, step)
        elif self._rate == 0.0 and now > self._start_time and step > self._start_step:
            self._rate = (step - self._start_step) / (now - self._start_time)
        return self._rate

    def episode(self, step: int, episode: int, score: float, length: int, epsilon: float) -> None:
        self.scores.append(score)
        row = {
            "step": step,
            "episode": episode,
            "score": score,
            "length": length,
            "epsilon": round(float(epsilon), 6),
            "steps_per_second": round(self.steps_per_second(step), 1),
            "wall_time": round(time.perf_counter() - self._start_time, 2),
            **{k: self.learner.get(k, "") for k in ("loss", "q_taken", "grad_norm")},
        }
        self._episodes.write(row)
        if self._tb:
            self._tb.add_scalar("episode/score", score, step)
            self._tb.add_scalar("episode/length", length, step)

    def evaluation(self, step: int, scores: np.ndarray) -> dict[str, float]:
        summary = {
            "step": step,
            "episodes": len(scores),
            "mean": float(np.mean(scores)),
            "median": float(np.median(scores)),
            "std": float(np.std(scores)),
            "min": float(np.min(scores)),
            "max": float(np.max(scores)),
        }
        self._evals.write(summary)
        if self._tb:
            self._tb.add_scalar("eval/mean", summary["mean"], step)
        self.message(
            f"eval at step {step:,}: mean {summary['mean']:.1f}, median {summary['median']:.1f}, "
            f"std {summary['std']:.1f} over {len(scores)} games"
        )
        return summary

    def progress(self, step: int, epsilon: float, learner: dict[str, float] | None = None) -> None:
        """Redraws the progress line (terminal) or logs a line every ``log_every`` steps."""
        if self._learning_mark is None and step >= self.learning_starts:
            self._learning_mark = (time.perf_counter(), step)
        if learner:
            self.learner = learner
            if self._tb:
                for k, v in learner.items():
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw >= 0.5 or step >= self.total_steps:
                self._last_draw = now
                self.stream.write("\r" + self._line(step, epsilon, bar=True) + "\x1b[K")
                self.stream.flush()
        elif step >= self._next_log:
            self._next_log = (step // self.log_every + 1) * self.log_every
            self.stream.write(self._line(step, epsilon, bar=False) + "\n")
            self.stream.flush()

    def due_for_log(self, step: int) -> bool:
        """Whether the next :meth:`progress` call will show anything (fetch metrics then)."""
        if self.tty:
            return time.perf_counter() - self._last_draw >= 0.5 or step >= self.total_steps
        return step >= self._next_log

    def _line(self, step: int, epsilon: float, bar: bool) -> str:
        rate = self.steps_per_second(step)
        mean = f"{np.mean(self.scores):.1f}" if self.scores else "-"
        loss = self.learner.get("loss")
        loss_text = f"{loss:.4g}" if loss is not None else "-"
        done = min(1.0, step / self.total_steps)
        head = f"[{'#' * int(20 * done):<20}] " if bar else ""
        return (
            f"{head}{step:,}/{self.total_steps:,} steps | {rate:,.0f} steps/s | "
            f"{self.eta(step)} | score(100) {mean} | eps {epsilon:.3f} | "
            f"loss {loss_text}"
        )

    def eta(self, step: int) -> str:
        """``ETA 1h05m`` from the learning phase's rate, or why there is none yet."""
        if step < self.learning_starts:
            return "ETA after learning starts"
        if self._learning_mark is None:  # progress() has not seen a learning step yet
            return "ETA ?"
        now = time.perf_counter()
        then, then_step = self._learning_mark
        if now - then < 1.0 or step <= then_step:
            return "ETA ?"
        rate = (step - then_step) / (now - then)
        return f"ETA {_format_duration(max(0, self.total_steps - step) / rate)}"

    def message(self, text: str) -> None:
        """Prints a line without breaking the progress bar."""
        prefix = "\r\x1b[K" if self.tty else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self._episodes.close()
        self._evals.close()
        if self._tb:
            self._tb.close()


class _CsvAppender:
    def __init__(self, path: str, fields: list[str]):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        torn = not new and _last_byte(path) != b"\n"  # a killed run's half line
        self._file = open(path, "a", newline="")
        if torn:
            self._file.write("\n")
        self._writer = csv.DictWriter(self._file, fieldnames=fields)
        if new:
            self._writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _tensorboard(path: str) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(path)


def _step_of(row: list[str], width: int) -> int | None:
    """The step of a CSV row, or None for a line that is not a row (a torn or garbled write).

    A row has the header's number of fields, all numbers or empty, an integer step first.
    """
    try:
        if len(row) != width:
            return None
        for value in row[1:]:
            if value:
                float(value)
        return int(row[0])
    except ValueError:
        return None


def truncate_csv(path: str, max_step: int) -> int:
    """Drops rows logged after ``max_step`` (when a run resumes from an earlier checkpoint).

    Lines that are not rows (the half-written last line of a killed run, a
    garbled one) are dropped too; returns how many. The file is rewritten
    atomically: a full disk leaves it as it was.
    """
    if not os.path.exists(path):
        return 0
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    body = [(r, _step_of(r, len(rows[0]))) for r in rows[1:] if r]
    kept = [rows[0]] + [r for r, step in body if step is not None and step <= max_step]
    dropped = sum(1 for _, step in body if step is None)
    atomic_write(path, lambda f: csv.writer(f).writerows(kept))
    return dropped


def read_csv(path: str) -> dict[str, np.ndarray]:
    """Numeric columns of a metrics file, as arrays (empty where the file has no rows).

    Lines that do not parse as rows of numbers are left out.
    """
    if not os.path.exists(path):
        return {}
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.DictReader(f))
    parsed = []
    for r in rows:
        try:
            parsed.append({k: float(v) if v not in ("", None) else np.nan for k, v in r.items()})
        except (TypeError, ValueError):
            continue
    if not parsed:
        return {}
    return {k: np.array([r.get(k, np.nan) for r in parsed]) for k in parsed[0] if k is not None}


def new_figure() -> tuple[Any, Any] | None:
    """``(figure, axes)`` for a learning curve, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt.subplots(figsize=(8, 4.5), dpi=100)


def save_figure(fig: Any, ax: Any, run_dir: str, title: str, xlabel: str, legend: bool) -> str:
    """Labels a learning curve and writes it to ``RUN_DIR/learning_curve.png`` atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (unclipped, whole game)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(loc="upper left")
    path = os.path.join(run_dir, "learning_curve.png")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)
    return path


def plot_learning_curve(run_dir: str, title: str, smooth: int = 20) -> str | None:
    """Writes ``learning_curve.png``: scores against agent steps; None without matplotlib."""
    figure = new_figure()
    if figure is None:
        return None
    fig, ax = figure
    episodes = read_csv(os.path.join(run_dir, "metrics.csv"))
    evals = read_csv(os.path.join(run_dir, "eval.csv"))
    if episodes:
        steps, scores = episodes["step"], episodes["score"]
        ax.plot(steps, scores, ".", color="0.75", markersize=3, label="game score")
        if len(scores) >= 2:
            k = min(smooth, len(scores))
            smoothed = np.convolve(scores, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smoothed, color="C0", label=f"mean of last {k} games")
    if evals:
        ax.errorbar(evals["step"], evals["mean"], yerr=evals["std"], fmt="o-", color="C3",
                    label="evaluation (mean, std)")  # fmt: skip
    if not (episodes or evals):  # a run stopped before its first game ended: say so
        ax.text(0.5, 0.5, "no finished games or evaluations yet", ha="center",
                transform=ax.transAxes)  # fmt: skip
    return save_figure(fig, ax, run_dir, title, "agent steps", legend=bool(episodes or evals))
