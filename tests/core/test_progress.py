"""The shared progress of long jobs (``rankwise.progress``): ETA arithmetic, plain lines when not on a terminal."""

from __future__ import annotations

import io

from rankwise import progress as progress_module
from rankwise.progress import Progress, duration


def test_eta_is_the_mean_unit_time_times_the_units_left_over_the_units_at_a_time():
    p = Progress("bench", total=5, done=1, parallel=2, plain=False, stream=io.StringIO())  # one resumed, not timed
    assert p.eta() == "?"
    assert p.finish(80.0).endswith("ETA 2m")  # 80 s x 3 left / 2 at a time = 120 s
    assert p.finish(160.0).endswith("ETA 2m")  # 120 s x 2 / 2
    assert p.finish(0.0).endswith("ETA 1m")  # 80 s x 1 / min(2, 1)
    assert p.finish(90.0).endswith("ETA 0s") and p.done == p.total
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600 + 5 * 60)] == ["0s", "59s", "1m", "1h00m", "1h05m"]


def test_plain_lines_when_asked_every_interval_and_at_close(monkeypatch):
    out, now = io.StringIO(), [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    with Progress("analyze", total=4, unit="layers", stream=out) as p:  # StringIO: not a terminal, no bar
        assert p.bar is None
        now[0] = 10.0
        p.finish(info="q_proj")  # 10 s < PLAIN_EVERY since the start: silent
        now[0] = 20.0
        p.finish(info="k_proj", say=True)
        now[0] = 60.0
        p.finish(info="v_proj")  # 40 s >= PLAIN_EVERY (30 s) since the last line
        now[0] = 80.0
        p.finish(info="o_proj")  # silent, but close() reports the end
    lines = out.getvalue().splitlines()
    assert lines == ["analyze: 2/4 layers (k_proj), elapsed 20s, ETA 20s",
                     "analyze: 3/4 layers (v_proj), elapsed 1m, ETA 20s",
                     "analyze: 4/4 layers (o_proj), elapsed 1m, ETA 0s"], lines
