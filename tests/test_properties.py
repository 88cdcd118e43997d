"""Property tests of the parsers of user input: CSV files, predict's points, checkpoint files and
override values. Each input ends in a correct result or in exactly one user-facing error with a
one-line message, never in another exception; under ``python -O`` too."""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npformat
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import make_cfg
from quadnet import checkpoint, optim
from quadnet.artifacts import METRIC_FIELDS, write_metrics
from quadnet.compose import Composer
from quadnet.config import TYPES, ConfigError, TrainConfig, to_dict
from quadnet.data import make_dataset, read_csv
from quadnet.model import initial_params
from quadnet.predict import InputError, parse_args, parse_point, read_points

FEW = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def one_line(e: BaseException) -> str:
    assert str(e) and "\n" not in str(e) and "Traceback" not in str(e), repr(str(e))
    return str(e)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("inputs")


# ---------------------------------------------------------------------------- CSV files

finite = st.floats(allow_nan=False, allow_infinity=False)
# a label's characters: anything a line may hold but the field and comment marks
chars = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=",#")


def _number(w: str) -> bool:
    try:
        return w.isascii() and float(w) is not None
    except ValueError:
        return False


# a word label: not a number (a number that is not whole is refused as a label: a feature, as likely)
word = st.text(chars, min_size=1, max_size=8).map(str.strip).filter(lambda w: w and not _number(w))
label = st.one_of(  # (as written, as read)
    st.integers(-(10**30), 10**30).map(lambda i: (str(i), i)),
    word.map(lambda w: (w, w)),
    st.sampled_from([("²", "²"), ("+7", 7), ("-0", 0), ("$a^$", "$a^$"), ("1.5x", "1.5x"), ("٣", "٣")]),
)


@FEW
@given(rows=st.lists(st.tuples(finite, finite, label), min_size=1, max_size=8), header=st.booleans())
def test_a_csv_of_points_reads_back_exactly(folder, rows, header):
    lines = ["x, y, label  # the header"] * header + ["# a comment", ""]
    lines += [f"{x!r},{y!r}, {written} " for x, y, (written, _) in rows]
    (folder / "p.csv").write_text("\ufeff" + "\n".join(lines), encoding="utf-8")  # (a BOM, as Excel writes)
    points, labels, names, *_ = read_csv(str(folder / "p.csv"), "data.path")
    assert names == ["x", "y"] and points.tolist() == [[x, y] for x, y, _ in rows]
    assert labels == [read for *_, (_, read) in rows]


line = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda *p: ",".join(p), *[st.sampled_from(["1", "-2.5", "nan", "1e999", "x", "", "²", " 3 ", "0x1"])] * 3
    ),
    st.builds(lambda a, b: f"{a},{b}", st.text(max_size=8), st.text(max_size=8)),
    st.just("1,2,3,label"),
)


@FEW
@given(text=st.one_of(st.lists(line, max_size=6).map("\n".join).map(str.encode), st.binary(max_size=30)))
def test_any_csv_reads_or_names_its_line_in_one_error(folder, text):
    path = folder / "any.csv"
    path.write_bytes(text)
    try:
        points, labels, names, *_ = read_csv(str(path), "data.path")
    except ConfigError as e:
        assert one_line(e).startswith(f"data.path={str(path)!r} ") or "the columns of data.path=" in one_line(e)
        return
    assert points.shape == (len(labels), len(names)) and len(names) >= 1 and np.isfinite(points).all() and labels
    assert all(isinstance(lab, int) or (isinstance(lab, str) and lab) for lab in labels)


# ---------------------------------------------------------------------------- predict's points


@FEW
@given(x=finite, y=finite, sep=st.sampled_from([",", " ", ", ", " ,  "]))
def test_a_point_reads_back_exactly(x, y, sep):
    assert parse_point(f" {x!r}{sep}{y!r} ", "argument 1") == (x, y)


@FEW
@given(text=st.text(max_size=20))
def test_any_point_text_is_a_point_or_one_error(text):
    try:
        point = parse_point(text, "argument 1")
    except InputError as e:
        assert one_line(e).startswith("argument 1: ")
        return
    assert point and all(math.isfinite(v) for v in point)


@FEW
@given(
    text=st.one_of(st.lists(st.text(max_size=20), max_size=5).map("\n".join).map(str.encode), st.binary(max_size=30))
)
def test_any_points_file_reads_or_gives_one_error(folder, text):
    (path := folder / "points.txt").write_bytes(text)
    try:
        points, labels = read_points(str(path))
    except InputError as e:
        assert one_line(e).startswith(f"points file {str(path)!r}")
        return
    assert all(math.isfinite(v) for p in points for v in p) and (labels is None or len(labels) == len(points))


@FEW
@given(argv=st.lists(st.text(max_size=10).filter(lambda t: not re.match("-[^0-9.]", t)), max_size=4))
def test_predicts_arguments_are_points_or_one_error(folder, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run, default, points, _ = parse_args([str(folder), *argv, "--file", "/dev/null"])
    except InputError as e:
        one_line(e)
        return
    except SystemExit as e:  # (argparse's own errors, through quadnet.cli.fail)
        assert e.code == 2 and err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ")
        return
    assert run == folder and not default and len(points) == len(argv)


# ---------------------------------------------------------------------------- checkpoint files


@pytest.fixture(scope="module")
def good(folder) -> bytes:
    """A checkpoint of a net with 3 hidden units and momentum buffers, as bytes."""
    cfg = make_cfg("hidden_dim=3", "momentum=0.9")
    params = initial_params(3, 0, "normal")
    state = {"params": params, "optimizer": {"momentum": {k: v * 0 for k, v in params.items()}}, "step": 2}
    history = [dict.fromkeys(METRIC_FIELDS, 0.5) | {"epoch": e} for e in (0, 1, 2)]
    arrays = checkpoint.arrays(
        state, epoch=2, config=to_dict(cfg), status="running", history=history, data=make_dataset(cfg.data)
    )
    checkpoint.save(folder / "good.npz", arrays)
    return (folder / "good.npz").read_bytes()


def load_or_refuse(path: Path) -> dict | None:
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        one_line(e)
        return None


def test_the_checkpoint_knows_the_most_buffers_a_rule_keeps():
    assert max(len(b) for b in optim.BUFFERS.values()) == checkpoint.BUFFERS


@FEW
@given(data=st.data())
def test_damaged_checkpoint_files_load_or_are_refused_in_one_line(folder, good, data):
    kind = data.draw(st.sampled_from(["truncated", "flipped", "random"]))
    if kind == "truncated":
        raw = good[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "flipped":
        at = data.draw(st.integers(0, len(good) - 1))
        raw = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1 :]
    else:
        raw = data.draw(st.binary(max_size=200))
    (folder / "bad.npz").write_bytes(raw)
    ck = load_or_refuse(folder / "bad.npz")
    assert ck is None or ck["params"]["W1"].shape == (2, 3)


arrays = st.one_of(
    st.builds(
        np.zeros, st.lists(st.integers(0, 4), max_size=3).map(tuple), st.sampled_from(["f8", "f4", "i8", "U3", "?"])
    ),
    st.just(np.array([{"a": 1}], dtype=object)),
)
members = st.sampled_from(
    ["meta", "history", "params/W1", "params/b2", "optimizer/momentum/W1", "optimizer/x/b1", "extra"]
)


@FEW
@given(changes=st.dictionaries(members, arrays, max_size=3))
def test_checkpoints_with_any_members_changed_load_or_are_refused_in_one_line(folder, good, changes):
    (folder / "good.npz").write_bytes(good)
    np.savez(folder / "changed.npz", **{**checkpoint.read(folder / "good.npz"), **changes})
    ck = load_or_refuse(folder / "changed.npz")
    assert ck is None or {k: v.shape for k, v in ck["params"].items()} == {
        "W1": (2, 3),
        "b1": (3,),
        "W2": (3, 4),
        "b2": (4,),
    }


def with_member(good: bytes, name: str, header: dict, body: bytes = b"") -> bytes:
    """The checkpoint with member `name` replaced by a .npy of this header and body."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            if info.filename != f"{name}.npy":
                z.writestr(info, src.read(info))
        npy = io.BytesIO()
        npformat.write_array_header_1_0(npy, header)
        z.writestr(f"{name}.npy", npy.getvalue() + body)
    return out.getvalue()


@FEW
@given(
    name=st.sampled_from(["meta", "history", "params/W1", "params/b2", "optimizer/momentum/b1"]),
    shape=st.lists(st.integers(0, 10**12), max_size=3).map(tuple),
    descr=st.sampled_from(["<f8", ">f8", "<f4", "<U100000000", "|O", "<i8"]),
    body=st.binary(max_size=64),
)
def test_crafted_headers_are_checked_before_anything_is_read(folder, good, name, shape, descr, body):
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    (folder / "crafted.npz").write_bytes(with_member(good, name, header, body))
    load_or_refuse(folder / "crafted.npz")  # (never a MemoryError: nothing is allocated before the check)


def test_a_huge_declared_shape_is_refused_by_name_and_an_extra_member_is_never_read(folder, good):
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    (folder / "huge.npz").write_bytes(with_member(good, "params/W1", header))
    with pytest.raises(checkpoint.CheckpointError, match=r"its weight W1 is not a float array of shape \(2, 3\)"):
        checkpoint.load(folder / "huge.npz")
    bomb = io.BytesIO(good)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as z, z.open("extra.npy", "w") as f:
        npformat.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (2**23,)})
        for _ in range(64):
            f.write(bytes(2**20))  # 64 MiB of zeros, a few KB deflated
    (folder / "bomb.npz").write_bytes(bomb.getvalue())
    assert len(bomb.getvalue()) < 2**20
    tracemalloc.start()
    try:
        assert checkpoint.load(folder / "bomb.npz")["epoch"] == 2
        assert tracemalloc.get_traced_memory()[1] < 2**22
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------- override values

values = st.one_of(  # (a value with an interpolation, "${…}", goes to Hydra: Composer never types one)
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6).filter(lambda t: "${" not in t),
    st.sampled_from(["1", "1.5", "1e3", "true", "nan", "inf", "-0", "007", "???", "seed", 10**400, -(2**63)]),
)  # fmt: skip
COMPOSER = Composer(None, None)  # (its loader is for config groups: a value alone does not need one)


def omegaconf_types(key: str, value: object) -> object:
    node = OmegaConf.structured(TrainConfig)
    try:
        OmegaConf.update(node, key, value)
        return OmegaConf.select(node, key, throw_on_missing=True)
    except (OmegaConfBaseException, OverflowError):  # (OmegaConf refuses it)
        return ConfigError


@FEW
@given(key=st.sampled_from(sorted(TYPES)), value=values)
@example(key="seed", value="???")
@example(key="data.path", value="???")
@example(key="lr", value=10**400)
def test_a_sweep_types_a_value_exactly_as_omegaconf_does(key, value):
    """Composer's short cuts (a value of the key's type, an int for a float) against OmegaConf itself."""
    try:
        got = COMPOSER._value(key, value)
    except ConfigError as e:
        one_line(e)
        got = ConfigError
    want = omegaconf_types(key, value)
    assert type(got) is type(want) and (got == want or repr(got) == repr(want)), (got, want)


# ---------------------------------------------------------------------------- what quadnet writes


@FEW
@given(rows=st.lists(st.fixed_dictionaries({k: st.floats() for k in METRIC_FIELDS[1:]}), max_size=4))
def test_metrics_csv_writes_epochs_as_whole_numbers_and_figures_exactly(folder, rows):
    rows = [{"epoch": float(10 * i), **r} for i, r in enumerate(rows)]  # (as a checkpoint's history holds them)
    write_metrics(folder / "metrics.csv", rows)
    lines = (folder / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_FIELDS) and [ln.split(",")[0] for ln in lines[1:]] == [
        str(10 * i) for i in range(len(rows))
    ]
    back = [[float(v) for v in ln.split(",")[1:]] for ln in lines[1:]]
    assert repr(back) == repr([[r[k] for k in METRIC_FIELDS[1:]] for r in rows])


# ---------------------------------------------------------------------------- python -O

OPTIMIZED = """
import json, sys
import numpy as np
from quadnet import checkpoint, data
from quadnet.config import ConfigError
assert False, "not optimized"  # (python -O strips it)
open("z.csv", "w").write("x,y,z,label\\n1,2,3\\n")
try:
    print("csv read", data.read_csv("z.csv", "data.path"))
except ConfigError as e:
    print("csv refused:", e)
arrays = dict(np.load(sys.argv[1]))
meta = json.loads(str(arrays["meta"]))
np.savez("evil.npz", **{**arrays, "meta": np.array(json.dumps({**meta, "format": "evil/9"}))})
try:
    print("checkpoint read", checkpoint.load("evil.npz")["epoch"])
except checkpoint.CheckpointError as e:
    print("checkpoint refused:", e)
"""


def test_bad_csv_and_checkpoints_are_refused_under_python_O(folder, good):
    (folder / "good.npz").write_bytes(good)
    r = subprocess.run(
        [sys.executable, "-O", "-c", OPTIMIZED, str(folder / "good.npz")], cwd=folder, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "csv refused: data.path='z.csv' line 2: '1,2,3' is not x,y,z,label" in r.stdout
    assert "checkpoint refused: 'evil.npz' is not a quadnet checkpoint (expected format" in r.stdout
