"""The loss plots: one point per step in step order, one logged point still drawn, whole-number step ticks."""

from loft_peft.plotting import loss_series, plot_run


def test_loss_series_keeps_one_point_per_step_after_a_resume():
    history = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.5}, {"step": 4, "loss": 2.4},
               {"step": 4, "eval_loss": 2.6}, {"step": 6, "loss": 2.2}]
    train, evaluation = loss_series(history)
    assert train == [(2, 3.0), (4, 2.4), (6, 2.2)]
    assert evaluation == [(4, 2.6)]


def test_a_run_with_one_logged_point_draws_it_on_one_axis_with_integer_ticks(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    # Keep the figure open to look at it; close("all") calls (a backend switch makes one) are not figures.
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) if hasattr(fig, "axes") else None)
    plot_run([{"step": 1, "loss": 3.0}, {"step": 1, "eval_loss": 3.1}], tmp_path / "loss.png", title="t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures[0].axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["training loss", "evaluation loss"]
    assert all(line.get_marker() not in (None, "None", "") for line in lines)  # a single point is visible
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
