"""Any table of numbers: a CSV with a header and any number of feature columns, through the data,
the three engines, a run's dir, its checkpoint, predict and the Python API."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from conftest import make_cfg, run_cli
from quadnet.config import ConfigError, DataConfig
from quadnet.data import make_dataset, read_csv
from quadnet.engines import build
from quadnet.loop import start_state
from quadnet.train import train

FEATURES = ["a", "b", "c", "d", "e"]


@pytest.fixture
def table(tmp_path):
    """Five feature columns on very different scales, the label first and named: three blobs."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 5)) * 2
    rows = [
        (lab, *(rng.normal(centres[k], 0.6) * [1, 10, 100, 0.01, 1e4]))
        for k, lab in enumerate("xyz")
        for _ in range(40)
    ]
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["kind", *FEATURES], *rows])
    return path


def test_a_header_names_the_columns_and_the_label_and_features_are_picked(table):
    x, labels, names, label, columns = read_csv(str(table), "data.path", "kind")
    assert label == "kind" and columns == ["kind", *FEATURES]
    assert x.shape == (120, 5) and names == FEATURES and set(labels) == {"x", "y", "z"}
    x2, _, names2, *_ = read_csv(str(table), "data.path", "kind", ["e", "a"])
    np.testing.assert_array_equal(x2, x[:, [4, 0]])
    assert names2 == ["e", "a"]
    with pytest.raises(ConfigError, match=r"'f' is not a column: the columns of data.path=.* are kind, a, b, c, d, e"):
        read_csv(str(table), "data.path", "kind", ["a", "f"])
    with pytest.raises(ConfigError, match="'kind' is the label: it cannot be a feature too"):
        read_csv(str(table), "data.path", "kind", ["kind", "a"])
    with pytest.raises(ConfigError, match=r"data.features=\[a,b,a\] is not allowed: name each column once, or null"):
        read_csv(str(table), "data.path", "kind", ["a", "b", "a"])  # (a column twice is not two features)
    assert read_csv(str(table), "data.path", "kind", [])[2] == FEATURES  # (none picked: every one, as 0.6 trained)


def test_the_splits_are_disjoint_and_standardized_on_the_training_split(table):
    d = make_dataset(DataConfig(name="csv", path=str(table), label="kind"))
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (77, 19, 24) and d.features == tuple(FEATURES)
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(d.x_train.std(0), 1, atol=1e-12)
    raw = read_csv(str(table), "data.path", "kind").x
    rows = {tuple(r) for r in raw}
    split = [{tuple(r) for r in d.raw(x).round(6)} for x in (d.x_train, d.x_val, d.x_test)]
    assert not (split[0] & split[1]) and not (split[0] & split[2]) and not (split[1] & split[2])
    assert sum(map(len, split)) == len(rows)
    plain = make_dataset(DataConfig(name="csv", path=str(table), label="kind", standardize=False, val_fraction=0))
    assert plain.shift is None and len(plain.x_val) == 0 and len(plain.x_train) == 96


def test_a_label_column_that_is_not_last_is_named_in_the_error(tmp_path):
    (path := tmp_path / "w.csv").write_text("target,f0,f1\nsetosa,1,2\nvirginica,3,4\n")
    with pytest.raises(ConfigError, match=r"line 2: .*column 'target' holds a word: .* give data.label=target$"):
        read_csv(str(path), "data.path")
    assert read_csv(str(path), "data.path", "target").labels == ["setosa", "virginica"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_engine_trains_a_wide_table_to_the_same_weights(table, optimizer):
    data = make_dataset(DataConfig(name="csv", path=str(table), label="kind"))
    cfg = make_cfg(f"optimizer={optimizer}", "lr=0.01", "hidden_dim=7", "threads=1", "device=cpu")
    results = {}
    for engine in ("numba", "torch", "numpy"):
        c = make_cfg(f"engine={engine}", f"optimizer={optimizer}", "lr=0.01", "hidden_dim=7", "threads=1")
        e = build([c], data, [start_state(cfg, data)], "cpu")
        e.run(200, lambda: False)
        results[engine] = (e.export([0])[0]["params"], e.metrics()[0])
    for engine in ("torch", "numpy"):
        for k, v in results["numba"][0].items():
            np.testing.assert_allclose(v, results[engine][0][k], rtol=0, atol=1e-10, err_msg=f"{engine} {k}")
        assert results["numba"][1] == pytest.approx(results[engine][1], abs=1e-10)
    assert results["numba"][0]["W1"].shape == (5, 7) and 0 <= results["numba"][1]["val_accuracy"] <= 1


def test_a_wide_run_predicts_a_whole_file_and_loads_in_python(table, tmp_path):
    s = train(
        make_cfg("data=csv", f"data.path={table}", "data.label=kind", "optimizer=adam", "lr=0.01", "epochs=300"),
        run_dir=tmp_path / "r",
    )
    assert s["status"] == "completed" and s["test_accuracy"] > 0.9 and s["val_accuracy"] > 0.9
    assert len(s["predictions"][0]["point"]) == 5 and s["config"]["objective"] == "val_loss"
    raw = np.array([p["point"] for p in s["predictions"]])  # (as the file has them: scaling undone)
    assert np.abs(raw[:, 4]).max() > 100
    out = tmp_path / "preds.csv"
    r = run_cli(str(tmp_path / "r"), "--file", str(table), "--out", str(out), module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"model: {tmp_path / 'r' / 'checkpoint.npz'} (")
    acc = float(r.stdout.splitlines()[1].split()[1])
    assert acc > 0.9 and "on 120 labelled points" in r.stdout
    with open(out) as f, open(table) as t:
        rows, truth = list(csv.DictReader(f)), [r["kind"] for r in csv.DictReader(t)]
    assert list(rows[0]) == [*FEATURES, "predicted", "p(x)", "p(y)", "p(z)"] and len(rows) == 120
    assert np.mean([row["predicted"] == lab for row, lab in zip(rows, truth, strict=True)]) == pytest.approx(
        acc, abs=1e-4
    )

    pd = pytest.importorskip("pandas")  # (the dev extra has it)

    import quadnet

    model, frame = quadnet.load(tmp_path / "r"), pd.read_csv(table)
    assert model.features == tuple(FEATURES)
    np.testing.assert_array_equal(model.predict(frame), [row["predicted"] for row in rows])  # (columns by name)
    np.testing.assert_array_equal(model.predict(frame[FEATURES[::-1]]), model.predict(frame[FEATURES].to_numpy()))
    r = run_cli(str(tmp_path / "r"), "1,2", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 2 and "the model reads a, b, c, d, e" in r.stderr


def test_a_checkpoint_from_before_features_and_scaling_still_predicts(tmp_path):
    """0.4's checkpoints have no features, shift or scale, and five metrics columns: x, y, unscaled."""
    train(make_cfg("epochs=50"), run_dir=tmp_path / "r")
    z = dict(np.load(tmp_path / "r" / "checkpoint.npz"))
    meta = json.loads(str(z["meta"]))
    for k in ("features", "shift", "scale"):
        meta.pop(k)
    z["meta"], z["history"] = np.array(json.dumps(meta)), z["history"][:, :5]
    np.savez(tmp_path / "old.npz", **z)
    old, new = (run_cli(str(p), "2,2", "-1,3", "--json", module="quadnet.predict", cwd=tmp_path)
                for p in (tmp_path / "old.npz", tmp_path / "r"))  # fmt: skip
    assert old.returncode == 0, old.stderr
    assert json.loads(old.stdout)["predictions"] == json.loads(new.stdout)["predictions"]


def test_the_seed_data_has_no_validation_split_and_is_selected_on_its_test_points(tmp_path):
    from quadnet.artifacts import summary_metric

    s = train(make_cfg("epochs=50"), run_dir=tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["val_loss"] is None
    assert summary_metric(s, "val_loss") == s["test_loss"]
    assert summary_metric(s, "val_error") == 1 - s["test_accuracy"]
    sampled = make_dataset(DataConfig(name="sampled"))
    assert len(sampled.x_val) == 51 and sampled.shift is None  # (0.2 of n_train more points, drawn after the rest)


def test_a_csv_run_from_before_the_validation_split_resumes_with_its_data_as_it_was(tmp_path):
    """0.4 had no val split and no scaling: its data is data.val_fraction=0 data.standardize=false now."""
    rng = np.random.default_rng(0)
    (table := tmp_path / "p.csv").write_text("".join(f"{x},{y},{int(x > y)}\n" for x, y in rng.normal(size=(50, 2))))
    old = ["data=csv", f"data.path={table}", "data.seed=3", "epochs=20"]
    train(make_cfg(*old, "data.val_fraction=0", "data.standardize=false"), run_dir=tmp_path / "r")
    ck = tmp_path / "r" / "checkpoint.npz"
    z = dict(np.load(ck))
    meta = json.loads(str(z["meta"]))
    for k in ("features", "shift", "scale"):
        meta.pop(k)
    for k in ("val_path", "val_fraction", "standardize", "features"):
        meta["config"]["data"].pop(k)
    z["meta"], z["history"] = np.array(json.dumps(meta)), z["history"][:, :5]
    np.savez(ck, **z)
    r = run_cli(*old[:3], "epochs=30", f"resume={tmp_path / 'r'}", "plots=false", cwd=tmp_path)
    assert r.returncode == 2 and "is not the data it was trained on" in r.stderr, r.stderr
    again = [*old[:3], "epochs=30", "data.val_fraction=0", "data.standardize=false", f"resume={tmp_path / 'r'}"]
    r = run_cli(*again, "plots=false", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["epoch"] == 30


def test_predict_never_writes_its_predictions_over_what_it_reads_or_a_run(tmp_path):
    train(make_cfg("epochs=5"), run_dir=tmp_path / "r")
    (tmp_path / "pts.csv").write_text("x,y\n1,2\n-1,3\n")
    (tmp_path / "model.npz").write_bytes((tmp_path / "r" / "checkpoint.npz").read_bytes())
    (tmp_path / "r" / ".hydra").mkdir()
    (tmp_path / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    (tmp_path / "d.csv").write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    train(make_cfg("data=csv", f"data.path={tmp_path / 'd.csv'}", "epochs=5"), run_dir=tmp_path / "c")
    for model, out, why in [("model.npz", "model.npz", "an input file"), ("r", "pts.csv", "an input file"),
                            ("c", "d.csv", "an input file"),  # (the data it was trained on)
                            ("r", "./pts.csv", "an input file"), ("r", "r/.hydra/config.yaml", "inside a run"),
                            ("r", "r/new.csv", "inside a run"), ("r", "link.csv", "a link"),
                            ("r", "/dev/null", "not a regular"), ("r", str(tmp_path), "not a regular")]:  # fmt: skip
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        r = run_cli(model, "--file", "pts.csv", "--out", out, module="quadnet.predict", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"allowed: it is {why}" in r.stderr, r.stderr
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, out
    r = run_cli("r", "--file", "pts.csv", "--out", "preds.csv", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "preds.csv").read_text().startswith("x,y,predicted,p(1)"), r.stderr


def test_features_too_big_to_standardize_are_refused_in_one_line(tmp_path):
    (tmp_path / "big.csv").write_text("a,b,label\n1e308,1,x\n-1e308,2,y\n0,3,x\n5,4,y\n1,1,x\n2,2,y\n")
    r = run_cli("data=csv", f"data.path={tmp_path / 'big.csv'}", "epochs=2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: 'a' is too big to standardize: data.standardize=false\n"
    assert not (tmp_path / "outputs").exists()


def test_a_wide_run_has_regions_over_its_principal_components_and_a_confusion_matrix(table, tmp_path, monkeypatch):
    """Five features: decision_regions.png over PC1 and PC2 (the axes say how much variance each holds),
    the GIF too; summary.json, confusion.png and loss.png say what a classifier's user reads."""
    from test_report import saved_figures, texts

    figures = saved_figures(monkeypatch)
    cfg = make_cfg("data=csv", f"data.path={table}", "data.label=kind", "epochs=40", "plots=true", "animate=true")
    s = train(cfg, run_dir=tmp_path / "r")
    assert {"decision_regions.png", "confusion.png", "loss.png"} <= set(figures)
    assert (tmp_path / "r" / "training.gif").is_file()
    ax = figures["decision_regions.png"].axes[0]
    shares = [re.fullmatch(r"PC(\d) \((\d+)% of variance\)", label) for label in (ax.get_xlabel(), ax.get_ylabel())]
    assert [m[1] for m in shares] == ["1", "2"] and int(shares[0][2]) >= int(shares[1][2]) > 0
    counts, classes = np.array(s["confusion"]["counts"]), s["confusion"]["classes"]
    truth = [classes.index(p["true"]) for p in s["predictions"]]
    guess = [classes.index(p["predicted"]) for p in s["predictions"]]
    np.testing.assert_array_equal(counts, np.bincount(np.multiply(truth, 3) + guess, minlength=9).reshape(3, 3))
    assert counts.sum() == s["test_points"] == 24 and np.trace(counts) / 24 == s["test_accuracy"]
    for k, c in enumerate(classes):
        mine = [g == k for t, g in zip(truth, guess, strict=True) if t == k]
        assert s["per_class_accuracy"][c] == pytest.approx(np.mean(mine))
    assert f"{np.trace(counts)} of 24 test points right" in figures["confusion.png"]._suptitle.get_text()
    assert {"x: ", "y: ", "z: "} <= {t[:3] for t in texts(figures["confusion.png"])}  # (each class's share right)
    assert [line.get_label() for line in figures["loss.png"].axes[0].lines] == ["train", "test", "validation"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["confusion"] == s["confusion"]


def test_a_big_test_sets_summary_keeps_the_misclassified_and_the_console_a_confusion_matrix(tmp_path):
    """A test set over 1,000 points: summary.json holds its confusion matrix and only its misclassified
    points (up to 1,000), not every prediction; the console says so and prints the matrix."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(3, 4))  # (close: some points are misclassified)
    for name, n in (("train.csv", 60), ("test.csv", 1200)):
        rows = [(*rng.normal(centres[k], 0.8).round(4), lab) for k, lab in enumerate(["red", "green", "blue_long"])
                for _ in range(n // 3)]  # fmt: skip
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([["a", "b", "c", "d", "colour"], *rows])
    r = run_cli("data=csv", f"data.path={tmp_path / 'train.csv'}", f"data.test_path={tmp_path / 'test.csv'}",
                "epochs=30", "hydra.run.dir=r", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    counts, preds = np.array(s["confusion"]["counts"]), s["predictions"]
    wrong = 1200 - np.trace(counts)
    assert s["test_points"] == counts.sum() == 1200 and 0 < len(preds) == min(wrong, 1000)
    assert all(p["predicted"] != p["true"] for p in preds)
    out = r.stdout + r.stderr
    assert f"(1192 more test points; summary.json keeps {len(preds)} misclassified)" in out
    header = next(line for line in out.splitlines() if "true \\ predicted" in line)
    assert header.split() == ["true", "\\", "predicted", "blue_long", "green", "red", "right"]
    table = out.splitlines()[out.splitlines().index(header) + 1 :][:3]
    assert [int(v) for v in table[0].split()[1:4]] == counts[0].tolist()
    assert table[0].split()[-1] == f"{100 * counts[0, 0] / counts[0].sum():.1f}%"
    assert all(f.is_file() for f in (tmp_path / "r" / n for n in ("decision_regions.png", "confusion.png")))


@pytest.fixture
def long_labels(tmp_path):
    """A run on two features whose labels are longer than the table's 'predicted' header."""
    rng = np.random.default_rng(4)
    rows = [f"{x:.3f},{y:.3f},{'versicolor_long' if x > 0 else 'setosa'}" for x, y in rng.normal(size=(60, 2))]
    (tmp_path / "iris.csv").write_text("x,y,species\n" + "\n".join(rows) + "\n")
    cfg = make_cfg("data=csv", f"data.path={tmp_path / 'iris.csv'}", "optimizer=adam", "lr=0.05", "epochs=100")
    assert train(cfg, run_dir=tmp_path / "r")["status"] == "completed"
    return tmp_path


def test_predicts_table_is_as_wide_as_its_longest_label(long_labels):
    r = run_cli("r", "2,0", "-2,0", module="quadnet.predict", cwd=long_labels)
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()[1:]
    assert "versicolor_long" in r.stdout and "setosa" in r.stdout and len({len(line) for line in table}) == 1, table


def test_predict_shows_a_files_true_labels_and_marks_the_wrong(long_labels):
    """The same point twice with two labels: one of them is wrong, and the table and JSON say which."""
    (long_labels / "pts.csv").write_text("species,y,x\nsetosa,0,2\nversicolor_long,0,2\nsetosa,0,-2\n")
    r = run_cli("r", "--file", "pts.csv", "--json", module="quadnet.predict", cwd=long_labels)
    rows = json.loads(r.stdout)["predictions"]
    assert [p["true"] for p in rows] == ["setosa", "versicolor_long", "setosa"], r.stderr
    wrong = [p["predicted"] != p["true"] for p in rows]
    r = run_cli("r", "5,5", "--file", "pts.csv", module="quadnet.predict", cwd=long_labels)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("model: r/checkpoint.npz") and lines[1].startswith("accuracy 0.6667 on 3 labelled")
    assert lines[2].split()[-3:] == ["true", "p(setosa)", "p(versicolor_long)"], lines
    assert ["✗ wrong" in line for line in lines[3:]] == [False, *wrong] and sum(wrong) == 1
    assert [line.split(")")[1].split()[2] for line in lines[3:]] == ["-", "setosa", "versicolor_long", "setosa"]
    assert len({len(line.removesuffix("  ✗ wrong")) for line in lines[2:]}) == 1, lines
