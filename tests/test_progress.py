"""What perfkit optimize and sweep show while they run: plain lines off a terminal, a bar on one."""

from __future__ import annotations

import io

from perfkit.progress import Progress


def test_off_a_terminal_each_event_is_one_plain_line() -> None:
    out = io.StringIO()  # not a tty: a pipe or a CI log
    with Progress(stream=out) as progress:
        progress("trial bucket_size: overlap.bucket_cap_mb=25")
        progress("[1/4] without (run 1/2): 30.1 ms/step", 1, 4)
    assert out.getvalue().splitlines() == [
        "perfkit: trial bucket_size: overlap.bucket_cap_mb=25",
        "perfkit: [1/4] without (run 1/2): 30.1 ms/step",
    ]


def test_on_a_terminal_a_bar_counts_the_stages_runs() -> None:
    out = io.StringIO()
    with Progress(stream=out, bar=True) as progress:
        progress("trial bucket_size: overlap.bucket_cap_mb=25")
        task = progress._live.tasks[0]
        assert task.description.startswith("trial bucket_size") and task.total is None
        progress("[1/4] without (run 1/2): 30.1 ms/step", 1, 4)
        progress("[2/4] overlap.bucket_cap_mb=25 (run 1/2): 24.0 ms/step", 2, 4)
        assert (task.completed, task.total) == (2, 4)
        progress("trial fused_optimizer: kernels.optimizer_impl=fused")  # a new stage starts at zero
        (task,) = progress._live.tasks
        assert task.completed == 0 and task.total is None and task.description.startswith("trial fused")
    assert progress._live is None  # taken down on leaving
    assert "[2/4] overlap.bucket_cap_mb=25" in out.getvalue()  # results stay above the bar
