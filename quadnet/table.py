"""A sweep's results as one table: a Parquet dataset, ``SWEEP/results/chunk-<first job>.parquet``,
one file a chunk of jobs, each written atomically (pandas, polars and DuckDB read the folder as
one table).

A row a job: ``job`` (its number), ``overrides``, one column per swept key (the value as the
job ran it), ``status``, ``error``, ``epoch``, ``epochs``, the final figures, ``objective``,
``train_seconds``, ``device``, ``engine``, ``meta`` (the checkpoint's meta, JSON: config,
classes, features, scaling) and the final parameters ``W1 b1 W2 b2`` (flattened, seed
layout). A job's metric history is not kept here (its job dir's ``metrics.csv`` has it):
at a million jobs it would be most of the table. pyarrow is imported only when a table is
read or written.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, get_args

import numpy as np

from quadnet import checkpoint
from quadnet.artifacts import atomic_write, final_figures
from quadnet.config import TYPES, flatten, to_dict
from quadnet.engines import METRICS
from quadnet.model import PARAMS, shapes

RESULTS = "results"
KINDS = {k: next((a for a in get_args(t) if a is not type(None)), t) for k, t in TYPES.items()}  # (int | None: int)
FIGURES = ("final_loss", *METRICS[1:])
ROW = ["job", "overrides", "status", "error", *FIGURES]  # what a resume reads of a job's row


def chunk_path(sweep: Path, first: int) -> Path:
    return Path(sweep) / RESULTS / f"chunk-{first:09d}.parquet"


def write_chunk(path: Path, jobs: list[Any], objectives: list[float | None]) -> None:
    """The rows of a chunk's jobs (:class:`quadnet.sweep.Job`; those without a result failed) and
    their objectives, as one Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}
    cols: dict[str, list[Any]] = {"job": [j.idx for j in jobs], "overrides": [j.overrides for j in jobs]}
    done = [j.result for j in jobs]
    figures = [final_figures(r.history) if r is not None else {} for r in done]
    cols["status"] = [r.status if r is not None else "failed" for r in done]
    cols["error"] = [j.error if r is None else None for j, r in zip(jobs, done, strict=True)]
    cols["epoch"] = [r.epoch if r is not None else None for r in done]
    cols["epochs"] = [j.cfg.epochs if j.cfg is not None else None for j in jobs]
    cols |= {key: [f.get(key) for f in figures] for key in FIGURES}
    cols["objective"] = objectives
    cols |= {key: [j.ran.get(key) for j in jobs] for key in ("train_seconds", "device", "engine")}
    configs = [to_dict(j.cfg) if j.cfg is not None else {} for j in jobs]
    cols["meta"] = [
        checkpoint.meta(r.state, epoch=r.epoch, config=c, status=r.status, data=j.data) if r is not None else None
        for j, r, c in zip(jobs, done, configs, strict=True)
    ]
    # every column typed, so that every chunk has one schema (a column of nulls too: no failed job, no job trained)
    types = {k: pa.float64() for k in (*FIGURES, "objective", "train_seconds")} | {"overrides": pa.list_(pa.string())}
    types |= dict.fromkeys(("job", "epoch", "epochs"), pa.int64())
    types |= dict.fromkeys(("error", "device", "engine", "meta"), pa.string())
    swept = [k for k in dict.fromkeys(o.split("=", 1)[0].lstrip("+~") for j in jobs for o in j.overrides if "=" in o)]
    flat = [flatten(c) for c in configs] if any("." in k for k in swept) else configs
    given = [dict(o.lstrip("+~").split("=", 1) for o in j.overrides if "=" in o) for j in jobs]
    for key in (k for k in swept if not k.startswith("hydra.") and k not in cols):
        # (as the job ran it; one that failed before it was composed: as its override says; not a number or text: JSON)
        ran = zip(flat, jobs, given, strict=True)
        cols[key] = [f.get(key) if j.cfg is not None else _typed(key, g.get(key)) for f, j, g in ran]
        cols[key] = [v if v is None or isinstance(v, int | float | str) else json.dumps(v) for v in cols[key]]
        if key == "data":  # (a config group: its name, as the override gives it)
            cols[key] = [(c.get("data") or {}).get("name", g.get(key)) for c, g in zip(configs, given, strict=True)]
        types[key] = arrow.get(KINDS.get(key), pa.string())  # (its config field's type; not a scalar: JSON text)
    arrays = {k: pa.array(v, type=types.get(k)) for k, v in cols.items()}
    for name in PARAMS:  # (flattened float64; a failed job's are null)
        flat = [np.asarray(r.state["params"][name], np.float64).ravel() if r is not None else None for r in done]
        offsets = np.cumsum([0, *(0 if f is None else f.size for f in flat)]).astype(np.int32)
        values = np.concatenate([f for f in flat if f is not None] or [np.zeros(0)])
        arrays[name] = pa.ListArray.from_arrays(offsets, values, mask=pa.array([f is None for f in flat]))
    table = pa.table(arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (zstd for the rest; weights hardly compress, and compressing them took most of the time)
    packed = {k: "none" if k in PARAMS else "zstd" for k in table.column_names}
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=packed, use_dictionary=False))


def _typed(key: str, text: str | None) -> Any:
    """An override's text as a value of its config field's kind (a number, true/false, text); None if it is not one."""
    kind = KINDS.get(key, str)
    try:
        if kind is bool:
            return {"true": True, "false": False}[text.lower()]
        return kind(text) if kind in (int, float) else text
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def read_chunk(path: Path, columns: list[str] | None = None, weights: bool = True) -> Any:
    """A chunk as a pyarrow Table (weights: with meta and the weights), or None when it is missing,
    damaged, half-written, empty or not a chunk (its job, overrides and status not of their types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if any(schema.field(k).type != kind for k, kind in (("job", pa.int64()), ("overrides", pa.list_(pa.string())),
                                                               ("status", pa.string()))):  # fmt: skip
            return None
        t = pq.read_table(path, columns=columns or [n for n in schema.names if weights or n not in ("meta", *PARAMS)])
        return t if len(t) else None
    except (OSError, ValueError, KeyError):  # (pyarrow's: ArrowInvalid is a ValueError, ArrowIOError an OSError)
        return None


def tables(sweep: Path) -> list[Path]:
    """The sweep's chunk files (regular files named as this module names them: a FIFO would block a read)."""
    found = (Path(sweep) / RESULTS).glob("chunk-[0-9]*.parquet")
    return sorted(p for p in found if re.fullmatch(r"chunk-\d{9}", p.stem) and p.is_file())


def rows(sweep: Path) -> tuple[Any, list[str], list[str]]:
    """Every job in the sweep's table, without its weights and meta, as one pyarrow Table (``overrides``
    as text), or None when no chunk can be read; the swept keys (the columns the
    overrides set); and the chunks that could not be read (their jobs are missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok, damaged, schema = [], [], None
    for path in tables(sweep):
        if (t := read_chunk(path, weights=False)) is not None:
            # (a chunk whose columns' types conflict with the others': not this sweep's, so damaged)
            with contextlib.suppress(TypeError, ValueError):  # (ArrowTypeError, ArrowInvalid)
                schema = pa.unify_schemas([schema or t.schema, t.schema], promote_options="permissive")
                ok.append(t)
                continue
        damaged.append(path.name)
    if not ok:
        return None, [], damaged
    t = pa.concat_tables(ok, promote_options="permissive")
    keys = pc.unique(pc.list_element(pc.split_pattern(pc.list_flatten(t["overrides"]), "=", max_splits=1), 0))
    swept = [k for k in dict.fromkeys(k.lstrip("+~") for k in keys.to_pylist()) if k in t.column_names]
    t = t.set_column(t.column_names.index("overrides"), "overrides", pc.binary_join(t["overrides"], " "))
    return t, swept, damaged


def _value(override: str) -> tuple[str, Any]:
    """An override as (key, value), a number as a float and true/false in any case as a bool: lr=1e-1 is lr=0.1."""
    key, _, text = override.partition("=")
    try:
        return key.lstrip("+~"), float(text)
    except ValueError:
        return key.lstrip("+~"), {"true": True, "false": False}.get(text.lower(), text)


def load(sweep: Path, job: str) -> dict[str, Any]:
    """A job of a sweep's table, named by its number or by overrides that it alone has (``"lr=0.1
    seed=2"``, in any order), as :func:`quadnet.checkpoint.load` gives a checkpoint; CheckpointError
    (one line) else. A chunk that cannot be read is passed over."""
    where, wanted, hits, lost = f"{str(sweep)!r} job {job}", {_value(o) for o in job.split()}, [], 0
    if not tables(sweep):
        raise checkpoint.CheckpointError(f"{where}: no results table ({RESULTS}/*.parquet); name its dir, {sweep}/N")
    for path in tables(sweep):
        if (t := read_chunk(path, ["job", "overrides"])) is None:
            lost += 1
            continue
        for i, (n, o) in enumerate(zip(t["job"].to_pylist(), t["overrides"].to_pylist(), strict=True)):
            if str(n) == job if job.isdigit() else wanted <= set(map(_value, o)):
                hits.append((path, i, n))
    if len(hits) != 1 or (found := read_chunk(hits[0][0])) is None:
        some = ", ".join(str(n) for *_, n in hits[:10]) + " …" * (len(hits) > 10)
        many = f"jobs {some} match" if hits else f"no such job{f' ({lost} chunks could not be read)' * bool(lost)}"
        raise checkpoint.CheckpointError(f"{where}: {many}; name one by its number or its overrides")
    row = found.slice(hits[0][1], 1).to_pylist()[0]
    if row["meta"] is None:
        raise checkpoint.CheckpointError(f"{where} did not train: {row['error']}")
    meta, cfg = checkpoint._meta(np.array(row["meta"]), where)
    want = shapes(cfg.hidden_dim, len(meta["classes"]), len(meta["features"]))
    try:
        params = {k: np.asarray(row[k], np.float64).reshape(want[k]) for k in PARAMS}
    except (TypeError, ValueError):
        raise checkpoint.CheckpointError(f"{where}: its parameters are not of the shapes its config says") from None
    state = {"params": params, "optimizer": {}, "step": meta["step"]}
    return {**meta, "state": state, "params": params, "cfg": cfg, "history": [], "path": f"{sweep}/{row['job']}"}
