"""Progress display and metrics files."""

import io
import os
import warnings

import numpy as np

from fdqn import reporting


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_redrawn_bar(tmp_path):
    stream = FakeTerminal()
    reporter = reporting.Reporter(str(tmp_path), total_steps=100, log_every=10, stream=stream)
    reporter.episode(50, 1, 3.0, 40, 0.5)
    reporter.progress(100, 0.5, {"loss": 0.25})
    reporter.close()
    text = stream.getvalue()
    assert text.startswith("\r[####################] 100/100 steps")
    assert "score(100) 3.0" in text and "loss 0.25" in text and "ETA" in text


def test_pipe_gets_plain_lines_every_log_every(tmp_path):
    stream = io.StringIO()
    reporter = reporting.Reporter(str(tmp_path), total_steps=100, log_every=10, stream=stream)
    for step in range(1, 101):
        reporter.progress(step, 0.1)
    reporter.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].startswith("10/100 steps") and lines[-1].startswith("100/100 steps")


def test_metrics_files_and_truncation_on_resume(tmp_path):
    reporter = reporting.Reporter(
        str(tmp_path), total_steps=100, log_every=10, stream=io.StringIO()
    )
    for i, step in enumerate([10, 20, 30]):
        reporter.episode(step, i + 1, float(i), 5, 0.2)
    reporter.evaluation(30, np.array([1.0, 3.0]))
    reporter.close()
    rows = reporting.read_csv(str(tmp_path / "metrics.csv"))
    np.testing.assert_array_equal(rows["step"], [10, 20, 30])
    np.testing.assert_array_equal(rows["score"], [0, 1, 2])
    evals = reporting.read_csv(str(tmp_path / "eval.csv"))
    np.testing.assert_array_equal(evals["mean"], [2.0])
    reporting.truncate_csv(str(tmp_path / "metrics.csv"), 20)
    np.testing.assert_array_equal(
        reporting.read_csv(str(tmp_path / "metrics.csv"))["step"], [10, 20]
    )
    assert reporting.plot_learning_curve(str(tmp_path), "test").endswith("learning_curve.png")


def test_learning_curve_of_a_run_without_games_is_drawn_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no entries
        path = reporting.plot_learning_curve(str(tmp_path), "no games yet")
    assert os.path.getsize(path) > 0


def test_eta_waits_for_learning_and_then_uses_its_rate(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: clock[0])
    r = reporting.Reporter(str(tmp_path), 10_000, 1_000, io.StringIO(), learning_starts=1_000)
    r.progress(500, 1.0)
    assert r.eta(500) == "ETA after learning starts"  # fast random steps promise nothing
    clock[0] = 101.0
    r.progress(1_000, 1.0)  # learning starts: 500 steps/s so far, not the rate from here
    clock[0] = 111.0
    r.progress(2_000, 0.5)  # 1,000 steps in 10 s: 100 steps/s while learning
    assert r.eta(2_000) == "ETA 1m20s"  # 8,000 steps left at 100 steps/s
    r.close()
