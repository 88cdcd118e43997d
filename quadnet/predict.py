"""``python -m quadnet.predict RUN_DIR_OR_CHECKPOINT [POINT ...] [--file F] [--json]``.

Asks a trained model which quadrant each point lies in. Points are ``x,y`` (negative
coordinates typed as they are: ``-2,2``), given as arguments, in a file (one per line,
``x,y`` or ``x y``; ``#`` starts a comment), or on stdin (``--file -``, or when no
point is given and stdin is not a terminal).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.cli import closed_pipe_ok

USAGE = "usage: python -m quadnet.predict RUN_DIR_OR_CHECKPOINT [x,y ...] [--file PATH|-] [--json]"


class InputError(ValueError):
    """Bad input to predict; the message is one line."""


def parse_point(text: str, where: str) -> tuple[float, float]:
    parts = [p for p in text.replace(",", " ").split() if p]
    if len(parts) != 2:
        raise InputError(f"{where}: {text.strip()!r} is not a point; write two numbers as x,y")
    try:
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise InputError(f"{where}: {text.strip()!r} is not a point; write two numbers as x,y") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InputError(f"{where}: {text.strip()!r} is not a point; coordinates must be finite numbers")
    return x, y


def read_points(lines: list[str], source: str) -> list[tuple[float, float]]:
    points = []
    for i, line in enumerate(lines, 1):
        content = line.split("#", 1)[0].strip()
        if content:
            points.append(parse_point(content, f"{source} line {i}"))
    return points


def parse_args(argv: list[str]) -> tuple[str, list[tuple[float, float]], bool]:
    """(checkpoint, points, as_json). Flags are parsed by hand so that '-2,2' is a point."""
    as_json, files, rest = False, [], []
    it = iter(argv)
    for tok in it:
        if tok in ("-h", "--help"):
            print(USAGE + "\n\n" + (__doc__ or "").split("\n\n", 1)[1].strip())
            sys.exit(0)
        elif tok == "--json":
            as_json = True
        elif tok == "--file" or tok.startswith("--file="):
            value = tok.split("=", 1)[1] if "=" in tok else next(it, None)
            if value is None:
                raise InputError("--file needs a path, or - for stdin")
            files.append(value)
        elif tok.startswith("--"):
            raise InputError(f"unknown option {tok!r}; {USAGE}")
        else:
            rest.append(tok)
    if not rest:
        raise InputError(f"no checkpoint given; {USAGE}")
    ckpt, point_args = rest[0], rest[1:]
    points = [parse_point(p, f"argument {i}") for i, p in enumerate(point_args, 1)]
    if not point_args and not files and not sys.stdin.isatty():
        files.append("-")
    for f in files:
        if f == "-":
            points += read_points(sys.stdin.read().splitlines(), "stdin")
        else:
            path = Path(f)
            if not path.is_file():
                raise InputError(f"points file {f!r} does not exist")
            try:
                lines = path.read_text().splitlines()
            except UnicodeDecodeError:
                raise InputError(f"points file {f!r} is not a text file of x,y lines") from None
            points += read_points(lines, f)
    if not points:
        raise InputError("no points given; pass x,y arguments, --file PATH, or points on stdin")
    return ckpt, points, as_json


def predict(params: dict[str, np.ndarray], points: np.ndarray) -> list[dict[str, Any]]:
    """Quadrant 1–4 and probabilities for each point (N, 2), from seed-layout weights."""
    from quadnet.artifacts import prediction_rows
    from quadnet.reference import forward, softmax

    scores, _ = forward(params, points)
    return prediction_rows(points, softmax(scores))


@closed_pipe_ok()
def main(argv: list[str] | None = None) -> None:
    from quadnet import checkpoint
    from quadnet.cli import fail

    try:
        ckpt_path, points, as_json = parse_args(sys.argv[1:] if argv is None else argv)
        ckpt = checkpoint.load(ckpt_path)
    except (InputError, checkpoint.CheckpointError) as e:
        fail(str(e))
    results = predict(ckpt["params"], np.array(points, dtype=np.float64))
    if as_json:
        print(json.dumps({"checkpoint": ckpt["path"], "epoch": ckpt["epoch"], "predictions": results}, indent=2))
        return
    print(f"model: {ckpt['path']} (hidden_dim={ckpt['config']['hidden_dim']}, epoch {ckpt['epoch']})")
    print(f"{'point':>18}  {'quadrant':>8}  {'p(I)':>9} {'p(II)':>9} {'p(III)':>9} {'p(IV)':>9}")
    for r in results:
        point = "(" + ", ".join(f"{v:g}" for v in r["point"]) + ")"
        probs = " ".join(f"{p:9.6f}" for p in r["probs"])
        note = "  on an axis: no true quadrant" if r["on_axis"] else ""
        print(f"{point:>18}  {r['quadrant']:>8}  {probs}{note}")


if __name__ == "__main__":
    main()
