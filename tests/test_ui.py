"""What a user sees of a run: its plots and GIF (quadnet.plots) and predict (the command and load())."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
from PIL import Image
from test_report import saved_figures, texts

from conftest import call_main, run_cli
from quadnet import checkpoint, plots
from quadnet.config import DataConfig, help_text
from quadnet.data import Dataset, make_dataset
from quadnet.engines.numpy import forward, loss_and_grads, sgd_update, softmax, softmax_loss
from quadnet.model import initial_params
from quadnet.predict import Model, load, main

TRAIN_HEADER = "point  predicted  p(predicted)  true"  # train's table of test points


def training(data_name="seed", epochs=1000, every=100, frames=50, lr=0.001):
    """(data, history, frames) of a NumPy-engine run: a history row every `every` epochs and
    about `frames` (epoch, params) snapshots, as the core hands them to the plots."""
    data = make_dataset(DataConfig(name=data_name, n_train=256, n_test=256))
    p = initial_params(50, 1, "normal")
    history, snaps = [], []
    for epoch in range(0, epochs + 1, every):
        for _ in range(every if epoch else 0):
            sgd_update(p, loss_and_grads(p, data.x_train, data.y_train, 1e-3)[1], {}, {"lr": lr}, 0)
        p = {k: v.copy() for k, v in p.items()}
        row = {"epoch": float(epoch)}
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            scores, _ = forward(p, x)
            row["loss" if split == "train" else "test_loss"] = softmax_loss(scores, y)[0]
            row[f"{split}_accuracy"] = float(np.mean(scores.argmax(1) == y))
        history.append(row)
        if epoch % max(every, epochs // frames) == 0:
            snaps.append((epoch, p))
    return data, history, snaps


# ---------------------------------------------------------------------------- plots


def test_decision_regions_have_a_key_ring_the_misclassified_and_state_the_test_accuracy(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    data, _, snaps = training(epochs=100, every=100)
    params = snaps[-1][1]  # 100 epochs: the seed program's wrong answers
    plots.plot_regions(tmp_path / "r.png", params, data, "hidden_dim=50 · 100 epochs")
    fig = figures["r.png"]
    words = texts(fig)
    for label in (
        "quadrant I",
        "quadrant II",
        "quadrant III",
        "quadrant IV",
        "train point",
        "test point",
        "misclassified",
    ):
        assert label in words, label
    wrong = sum(
        int(np.sum(forward(params, x)[0].argmax(1) != y))
        for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test))
    )
    ax = fig.axes[0]
    assert wrong > 0 and len(ax.collections[-1].get_offsets()) == wrong  # one ring per misclassified point
    acc = float(np.mean(forward(params, data.x_test)[0].argmax(1) == data.y_test))
    assert ax.get_title().startswith("hidden_dim=50 · 100 epochs\n") and f"test accuracy {acc:.1%}" in ax.get_title()
    assert f"{wrong} of 8 points (train and test) misclassified" in ax.get_title()
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_long_class_names_and_a_long_title_stay_inside_the_decision_regions(tmp_path, monkeypatch):
    """Five long labels over six features: the key's names distinct, the title, key and both axis labels in the
    figure (no ink at its left or right edge); a label longer than 40 characters is cut in its middle."""
    figures = saved_figures(monkeypatch)
    x, y = np.random.default_rng(1).normal(size=(100, 6)), np.arange(100) % 5
    names = tuple(f"very_long_class_name_{k}" for k in range(1, 6))
    data = Dataset(x[:80], y[:80], x[80:], y[80:], names, quadrants=False)
    title = " ".join(f"option_{k}=value_{k}" for k in range(12))
    plots.plot_regions(tmp_path / "r.png", initial_params(20, 1, "normal", 5, 6), data, title)
    ax, fig = figures["r.png"].axes[0], figures["r.png"]
    assert len({t.get_text() for t in ax.get_legend().get_texts()}) == 8 and not ax.lines  # (no quadrants' axes)
    for text in (ax.xaxis.label, ax.yaxis.label, *ax.get_legend().get_texts()):
        assert fig.bbox.x0 <= text.get_window_extent().x0 < text.get_window_extent().x1 <= fig.bbox.x1, text
    ink = np.asarray(Image.open(tmp_path / "r.png").convert("L")) < 128
    assert not ink[:, :2].any() and not ink[:, -2:].any()
    long = Dataset(x[:80], y[:80], x[80:], y[80:], tuple(f"{k}{'_' * 50}{k}" for k in "abcde"), quadrants=False)
    assert plots.class_names(long)[0] == f"class a{'_' * 12}…{'_' * 19}a" and len(set(plots.class_names(long))) == 5


def test_many_points_are_small_and_see_through(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    data, _, snaps = training("sampled", epochs=0)
    plots.plot_regions(tmp_path / "r.png", snaps[-1][1], data, "sampled")
    train, test = figures["r.png"].axes[0].collections[:2]
    assert train.get_sizes()[0] <= 12 and train.get_alpha() < 1 and test.get_sizes()[0] <= 12


def test_loss_curves_mark_their_points_and_survive_nan(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    _, history, _ = training(epochs=400, every=100)  # 5 rows
    plots.plot_curves(tmp_path / "few.png", history, "few")
    loss_ax = figures["few.png"].axes[0]
    assert [line.get_label() for line in loss_ax.lines] == ["train", "test"]
    assert all(line.get_marker() == "o" for line in loss_ax.lines)
    assert "without the L2 term" in loss_ax.get_ylabel() and loss_ax.get_yscale() == "log"
    assert "at epoch 400:" in figures["few.png"]._suptitle.get_text()
    _, history, _ = training(epochs=1000, every=10)  # 101 rows: a curve, its points marked small
    plots.plot_curves(tmp_path / "many.png", history, "many")
    assert all(line.get_marker() == "." for line in figures["many.png"].axes[0].lines)
    diverged = [*history[:3], dict.fromkeys(history[0], math.nan) | {"epoch": 120.0}]
    plots.plot_curves(tmp_path / "nan.png", diverged, "diverged")
    assert "over 1e+100 or not finite from epoch 120" in texts(figures["nan.png"])
    assert "train loss not finite" in figures["nan.png"]._suptitle.get_text()


def test_a_loss_that_grows_huge_before_it_overflows_is_drawn(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    rows = [{"epoch": 10.0 * i, "loss": v, "test_loss": 2 * v} for i, v in enumerate(np.geomspace(1, 2e288, 57))]
    plots.plot_curves(tmp_path / "huge.png", [*rows, {"epoch": 570.0, "loss": math.nan}], "lr=300")
    assert "over 1e+100 or not finite from epoch 200" in texts(figures["huge.png"])


def test_a_short_runs_log_axis_has_tick_labels_between_its_powers_of_ten(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    _, history, _ = training(epochs=100, every=1)
    plots.plot_curves(tmp_path / "loss.png", history, "100 epochs")
    ax = figures["loss.png"].axes[0]
    low, high = ax.get_ylim()
    ticks = ax.get_yticklabels() + ax.get_yticklabels(minor=True)
    assert len([t for t in ticks if t.get_text() and low <= t.get_position()[1] <= high]) > 2


def test_labels_are_drawn_as_written_and_the_key_names_only_what_is_there(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    x = np.array([[1.0, 1], [-1, -1], [2, 2], [-2, -2]])
    data = Dataset(x[:2], np.arange(2), x[2:], np.arange(2), ("$a^$", "b"), quadrants=False)
    right = {"W1": np.array([[1.0, -1], [1, -1]]), "b1": np.zeros(2), "W2": np.eye(2), "b2": np.zeros(2)}
    plots.plot_regions(tmp_path / "r.png", right, data, "every point right")
    words = texts(figures["r.png"])
    assert "class \\$a^\\$" in words and "misclassified" not in words  # (an escaped $ is drawn as itself)
    assert "0 of 4 points" in figures["r.png"].axes[0].get_title()


def test_loss_curves_draw_the_validation_split_where_the_run_has_one(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    _, history, _ = training(epochs=400, every=100)
    rows = [r | {"val_loss": 1.1 * r["test_loss"], "val_accuracy": r["test_accuracy"] / 2} for r in history]
    plots.plot_curves(tmp_path / "val.png", rows, "with a validation split")
    for ax, key in zip(figures["val.png"].axes, ("val_loss", "val_accuracy"), strict=True):
        assert [line.get_label() for line in ax.lines] == ["train", "test", "validation"]
        np.testing.assert_allclose(ax.lines[2].get_ydata(), [r[key] for r in rows])


def test_the_plane_of_wide_data_is_its_leading_principal_components_and_its_regions_the_nets(tmp_path, monkeypatch):
    """Four features in a tilted plane, off the origin: PC1 and PC2 span it (all the variance), and the
    regions drawn at each test point's place on the plot are the class the net gives that point."""
    figures = saved_figures(monkeypatch)
    rng = np.random.default_rng(0)
    ab = rng.normal(size=(300, 2)) * [3, 1]
    x = np.column_stack([ab, ab @ [[1, 1], [1, -1]]]) + np.array([5, -2, 1, 0])
    data = Dataset(x[:200], np.zeros(200, int), x[200:], np.zeros(100, int), (0, 1, 2), quadrants=False)
    origin, directions, labels = plots.plane(data)
    np.testing.assert_allclose(directions @ directions.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose((x - origin) @ directions.T @ directions + origin, x, atol=1e-9)
    shares = [int(label.split("(")[1].split("%")[0]) for label in labels]
    assert labels[0].startswith("PC1 (") and labels[1].endswith("% of variance)") and 99 <= sum(shares) <= 101
    params = initial_params(20, 3, "normal", 3, 4)
    params["W1"] /= 3  # (regions wide enough that most points are off their borders)
    plots.plot_regions(tmp_path / "r.png", params, data, "4 features")
    ax = figures["r.png"].axes[0]
    image, lim = ax.images[0].get_array(), ax.get_xlim()[1]
    pixel = np.rint((((data.x_test - origin) @ directions.T) + lim) / (2 * lim) * (len(image) - 1)).astype(int)
    drawn = image[pixel[:, 1], pixel[:, 0]]
    expected = 0.4 * plots.colors(data.classes)[plots.predict_class(params, data.x_test)] + 0.6
    assert np.mean(np.abs(drawn - expected).max(axis=1) < 1e-6) > 0.9 and len(set(map(tuple, expected))) > 1
    assert plots.plane(Dataset(x[:, :2], np.zeros(300, int), x[:, :2], np.zeros(300, int), (0,)))[2] == ["x", "y"]
    scaled = dataclasses.replace(data, x_train=x[:200, :2], x_test=x[200:, :2], shift=np.zeros(2), scale=np.ones(2))
    assert plots.plane(scaled)[2] == ["x (standardized)", "y (standardized)"]  # (values not as the file has them)


def test_the_gifs_loss_panel_is_log_x_as_its_frames_are_log_spaced(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn, draw = [], FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda canvas: drawn.append(canvas.figure) or draw(canvas))
    data, history, snaps = training(epochs=1000, every=10)
    plots.animate(tmp_path / "a.gif", snaps, history, data, "log-spaced")
    loss_ax = drawn[-1].axes[1]
    assert loss_ax.get_xscale() == "symlog" and loss_ax.get_xlim()[0] == 0 and loss_ax.get_xlim()[1] >= 1000


def test_the_console_prints_a_confusion_matrix_that_fits():
    from quadnet.console import confusion

    s = {"classes": ["cat", "a_long_dog_name", 3], "confusion": {"counts": [[5, 1, 0], [0, 7, 3], [0, 0, 0]]}}
    s["per_class_accuracy"] = {"cat": 5 / 6, "a_long_dog_name": 0.7, "3": None}
    lines = confusion(s)
    assert lines[0] == "" and [len(line) for line in lines[1:]] == [len(lines[1])] * 4  # (columns line up)
    assert lines[1].split() == ["true", "\\", "predicted", "cat", "a_long_dog_name", "3", "right"]
    assert lines[2].split() == ["cat", "5", "1", "0", "83.3%"] and lines[4].split() == ["3", "0", "0", "0", "n/a"]
    many = {"classes": list(range(11)), "confusion": {"counts": np.eye(11, dtype=int).tolist()}}
    assert confusion(many | {"per_class_accuracy": {str(c): 1.0 for c in range(11)}}) == []  # (over 10 classes)


@pytest.mark.parametrize("data_name", ["seed", "sampled"])
def test_the_training_gif_has_a_frame_per_snapshot_and_stays_small(data_name, tmp_path):
    epochs, every, lr = (10000, 100, 0.001) if data_name == "seed" else (500, 10, 0.05)
    data, history, snaps = training(data_name, epochs=epochs, every=every, lr=lr)
    assert len(snaps) == 51
    start = time.perf_counter()
    plots.animate(tmp_path / "train.gif", snaps, history, data, "hidden_dim=50 lr=0.001 reg=0.001 seed=1")
    seconds = time.perf_counter() - start
    size = (tmp_path / "train.gif").stat().st_size
    assert size < 2_000_000 and seconds < 10, (size, seconds)
    with Image.open(tmp_path / "train.gif") as gif:
        assert gif.n_frames == len(snaps) and gif.format == "GIF"
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"))
    assert first.shape == last.shape and first.shape[1] > first.shape[0] and not np.array_equal(first, last)
    with pytest.raises(ValueError, match="at least one frame"):
        plots.animate(tmp_path / "none.gif", [], history, data, "")


# ---------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dir with outputs/: one completed run, then a newer one that diverged."""
    root = tmp_path_factory.mktemp("runs")
    assert run_cli("epochs=200", "plots=false", cwd=root).returncode == 0
    time.sleep(1.1)
    assert run_cli("lr=1e6", "epochs=40", "plots=false", cwd=root).returncode == 3  # diverged: not a model
    status = {d: json.loads((d / "summary.json").read_text())["status"] for d in (root / "outputs").iterdir()}
    done = [d for d, s in status.items() if s == "completed"]
    diverged = [d for d, s in status.items() if s == "diverged"]
    assert len(done) == len(diverged) == 1
    return root, done[0], diverged[0]


def _predict(capsys, *argv):
    return call_main(main, capsys, *argv)


def test_predict_defaults_to_the_newest_completed_run_and_prints_trains_columns(runs, capsys, monkeypatch):
    root, done, _ = runs
    monkeypatch.chdir(root)
    code, out, err = _predict(capsys, "-2,2", "2,2", "0,1")  # the first argument is a point, not a run dir
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"model: outputs/{done.name}/checkpoint.npz (hidden_dim=50, completed at epoch 200)  " + (
        "[the newest completed run under outputs/]"
    )
    assert TRAIN_HEADER in lines[1] and lines[1].split()[4:] == ["p(I)", "p(II)", "p(III)", "p(IV)"]
    assert lines[2].split()[:2] == ["(-2,", "2)"]
    assert lines[4].startswith("          (0, 1)") and lines[4].split(")")[1].split()[2] == "-"  # no true quadrant


def test_the_help_says_what_predict_reads_and_what_train_writes(capsys):
    code, out, _ = _predict(capsys, "--help")
    assert code == 0 and "the features, comma-separated, e.g. x,y" in out
    assert "its header naming them if it has one" in out
    assert "SWEEP/N" in out and "SWEEP --job N" in out
    assert "plots=true" in help_text() and "loss.png, confusion.png and decision_regions.png" in help_text()


def test_predict_prints_what_load_gives(runs, capsys):
    _, done, _ = runs
    points = [[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0], [0.3, -7.5]]
    code, out, _ = _predict(capsys, done, *(f"{x},{y}" for x, y in points), "--json")
    assert code == 0
    printed = json.loads(out)["predictions"]
    model = load(done)
    assert [p["predicted"] for p in printed] == model.predict(points).tolist()
    assert np.array_equal(np.array([p["probs"] for p in printed]), model.predict_proba(np.array(points)))
    _, table, _ = _predict(capsys, done, "0.3,-0.2")
    predicted, prob, true = table.splitlines()[2].split()[2:5]
    assert (int(predicted), prob, true) == (
        model.predict([0.3, -0.2])[0],
        f"{model.predict_proba([0.3, -0.2]).max():.9f}",
        "4",
    )
    # the same numbers as the NumPy reference, bit for bit, for ordinary points
    assert np.array_equal(model.predict_proba(points), softmax(forward(model.params, np.array(points))[0]))


def test_load_takes_lists_arrays_and_one_point(runs):
    model = load(runs[1] / "checkpoint.npz")
    assert isinstance(model, Model) and model.status == "completed" and model.epoch == 200
    assert model.predict([2, 2]).shape == (1,) and model.predict_proba((2, 2)).shape == (1, 4)
    assert model.predict(np.zeros((0, 2))).shape == (0,)
    assert model.predict([[1, 1], [-1, -1]]).dtype.kind == "i"
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        model.predict([1, 2, 3])
    with pytest.raises(ValueError, match="points must be finite"):
        model.predict([[np.nan, 1], [np.inf, 1]])


def test_huge_points_give_finite_probabilities(runs, capsys):
    code, out, err = _predict(capsys, runs[1], "1e308,1e308", "-1e308,-1e308", "1e-300,-1e308", "--json")
    assert code == 0, err
    probs = np.array([p["probs"] for p in json.loads(out)["predictions"]])
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1)
    code, out, _ = _predict(capsys, runs[1], "1e308,1e308")
    assert code == 0 and "(1e+308, 1e+308)" in out


def test_a_diverged_or_non_finite_model_is_refused_in_one_line(runs, tmp_path, capsys):
    _, done, diverged = runs
    code, _, err = _predict(capsys, diverged, "1,1")
    assert code == 2 and err.count("\n") == 1 and "cannot predict: its status is diverged at epoch" in err
    ck = checkpoint.load(done)
    ck["params"]["W2"][0, 0] = math.nan
    state = {"params": ck["params"]}
    arrays = checkpoint.arrays(
        state, epoch=5, config=ck["config"], status="completed", history=[], data=make_dataset(DataConfig())
    )
    checkpoint.save(tmp_path / "nan.npz", arrays)
    code, _, err = _predict(capsys, tmp_path / "nan.npz", "1,1")
    assert code == 2 and "with non-finite W2" in err and err.count("\n") == 1
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        load(tmp_path / "nan.npz")


def test_a_run_dir_predicts_with_its_checkpoint_and_says_how_it_ended(runs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ck = checkpoint.load(runs[1])
    state = {"params": {k: v + 1 for k, v in ck["params"].items()}}
    arrays = checkpoint.arrays(
        state, epoch=300, config=ck["config"], status="interrupted", history=[], data=make_dataset(DataConfig())
    )
    checkpoint.save(run / "checkpoint.npz", arrays)
    assert load(run).path == str(run / "checkpoint.npz") and load(run).status == "interrupted"
    code, out, _ = _predict(capsys, run, "1,1")
    assert code == 0 and out.startswith(f"model: {run / 'checkpoint.npz'} (hidden_dim=50, interrupted at epoch 300)")


@pytest.mark.parametrize(
    "args,words",
    [
        (["{run}/summary.json", "1,1"], "summary.json' is not a quadnet checkpoint (truncated or corrupt, or not a"),
        (["/dev/null", "1,1"], "'/dev/null' is not a quadnet checkpoint"),
        (["{run}", "--file", "/dev/null"], "no points given (/dev/null held none)"),
        (["{run}", "--file", "{run}/summary.json"], "line 1: '{{' is not a point"),
        (["{run}", "--file", "{run}/checkpoint.npz"], "is not a text file of x,y lines"),
        (["{run}", "--file", "{run}/nope.txt"], "points file '{run}/nope.txt' does not exist"),
        (["{run}", "1,nan"], "is not a point; write finite numbers as x,y, one a feature"),
        (["{run}", "1,,2"], "'1,,2' is not a point"),  # (a number left out is not (1, 2))
        (["{run}", "--bogus", "1,1"], "unknown option --bogus"),
    ],
)
def test_files_that_are_not_what_predict_needs_get_one_line(runs, args, words, capsys):
    run = runs[1]
    code, _, err = _predict(capsys, *(a.format(run=run) for a in args))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words.format(run=run) in err, err
    assert "Traceback" not in err and "Weights only" not in err


def test_load_raises_a_checkpoint_error_for_a_file_that_is_not_one(runs):
    for path in (runs[1] / "summary.json", "/dev/null", runs[1] / "nope"):
        with pytest.raises(checkpoint.CheckpointError):
            load(path)


def test_labels_that_name_colours_are_drawn_in_those_colours():
    assert plots.colors(["blue", "green", "red"]).tolist() == [[0, 0, 1], [0, 128 / 255, 0], [1, 0, 0]]
    assert len({tuple(c) for c in plots.colors(["north", "red", "south"])}) == 3  # (not all colours: the palette)
    assert plots.colors([1, 2, 3, 4]).tolist() == plots.colors(["a", "b", "c", "d"]).tolist()
