"""Reading a run's metrics.jsonl (the evaluations logged by training and the sweep), and fid.png."""

import json
import math
import warnings
from pathlib import Path

from scgcm.eval.fid import fid_label
from scgcm.eval.plot import plot_lines


def read_fids(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{mode: [(step, FID), …]} from the `fid_<mode>` entries of metrics.jsonl (finite values only)."""
    return {mode: [(s, v["fid"]) for s, v in points] for mode, points in read_evaluations(metrics_jsonl).items()}


NUM_KEY = "num_fid_samples"
"""metrics.jsonl key of the number of samples behind the FIDs of a record (not a mode)."""


def parse_record(line: str) -> tuple[dict | None, str]:
    """(record, "") for a complete metrics.jsonl line: a JSON object whose "step" is an integer ≥ 0 and
    whose other values are numbers or null, as training and the sweep write them; else (None, why)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not a complete JSON record (torn by a crash?)"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not a record"
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None, f"its step is {json.dumps(step)}, not a whole number ≥ 0"
    for key, value in record.items():
        if key != "step" and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return None, f"its {key!r} is {json.dumps(value)[:30]}, not a number or null"
    return record, ""


def read_records(metrics_jsonl: str | Path, *, warn: bool = True) -> list[dict]:
    """The records of metrics.jsonl, the one reader of every tool (report, sweep, fid.png, a resumed training).
    A line that is not a record (`parse_record`: torn, or with values of the wrong type) is skipped with one
    warning naming its line number; an unfinished last line (no newline yet: being written) silently."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record, why = parse_record(line)
        if record is not None:
            records.append(record)
        elif warn and not (number == len(lines) and not text.endswith("\n") and why.startswith("not a complete")):
            warnings.warn(f"{path}: line {number} skipped, {why}: {line[:60]}", stacklevel=2)
    return records


def _modes(record: dict) -> list[str]:
    return [k[4:] for k in record if k.startswith("fid_") and k != NUM_KEY]


def read_evaluations(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """{mode: [(step, {"fid": …, "precision": …, "recall": …, "num": …}), …]} of the evaluations in
    metrics.jsonl (records with a finite `fid_<mode>`; `num` from `num_fid_samples` when logged)."""
    series: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for record in read_records(metrics_jsonl):
        for mode in _modes(record):
            v = record[f"fid_{mode}"]
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                continue
            entry = {"fid": float(v), **{name: float(record[f"{name}_{mode}"]) for name in ("precision", "recall")
                                         if isinstance(record.get(f"{name}_{mode}"), (int, float))}}
            if isinstance(record.get(NUM_KEY), (int, float)):  # written as a float
                entry["num"] = int(record[NUM_KEY])
            series.setdefault(mode, []).append((record["step"], entry))
    return series


def evaluated_steps(metrics_jsonl: str | Path, modes: tuple[str, ...]) -> set[int]:
    """Steps with a logged FID (an undefined one, null, included) for every one of `modes`."""
    per_mode = [{r["step"] for r in read_records(metrics_jsonl) if f"fid_{mode}" in r} for mode in modes]
    return set.intersection(*per_mode) if per_mode else set()


def plot_fid(metrics_jsonl: str | Path, out_png: str | Path, size: tuple[int, int] = (720, 440),
             network: str = "inception") -> bool:
    """FID against training step, one line per mode (log-scaled when it spans a decade); PIL only.
    The axis names the sample count when under 50,000. Returns False (and writes nothing) when
    metrics.jsonl holds no FID yet."""
    evaluations = read_evaluations(metrics_jsonl)
    if not evaluations:
        return False
    nums = sorted({v["num"] for points in evaluations.values() for _, v in points if "num" in v})
    ylabel = " / ".join(fid_label(n, network) for n in nums) if nums else fid_label(0, network).split(" (")[0]
    series = {mode: [(s, v["fid"]) for s, v in points] for mode, points in evaluations.items()}
    return plot_lines(series, out_png, xlabel="step", ylabel=ylabel, size=size, integer_x=True)
