"""From result rows to what people read: ratios, the table (text and markdown), merged
documents, and the files a run writes (JSON, markdown, plots).

Nothing here measures: every number comes from the rows (``bench/worker.py``), and a ratio
only ever divides two rows of the same run (or of runs merged from one machine).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MIB = 1 << 20
SCHEMA = 2
# The peers a user would pick instead of dense_ext: the ratio "vs best naive" divides by the
# fastest of these measured beside a row (checkpointing trades time for memory: not a peer
# for speed).
SPEED_PEERS = (
    "naive",
    "naive-channels_last",
    "naive-compile",
    "naive-graph",
    "naive-channels_last-graph",
)


def _group_key(r: dict) -> tuple:
    return (r.get("suite"), r.get("model"), r.get("batch"), r.get("dtype"), r.get("device"))


def add_ratios(rows: list[dict]) -> None:
    """Each row's memory, time and max batch as ratios to the naive row of the same setting,
    and its step time as a ratio to the fastest naive peer (``SPEED_PEERS``)."""
    ok = [r for r in rows if not r.get("error") and not r.get("skipped")]
    naive = {_group_key(r): r for r in ok if r.get("variant") == "naive"}
    fastest: dict[tuple, dict] = {}
    for r in ok:
        if r.get("variant") in SPEED_PEERS and r.get("step_time_s"):
            best = fastest.get(_group_key(r))
            if best is None or r["step_time_s"] < best["step_time_s"]:
                fastest[_group_key(r)] = r
    for r in ok:
        base = naive.get(_group_key(r))
        if base is not None:
            _ratios_to_naive(r, base)
        peer = fastest.get(_group_key(r))
        if peer is not None and r.get("step_time_s"):
            r["step_time_vs_best_naive"] = r["step_time_s"] / peer["step_time_s"]
            r["best_naive_variant"] = peer["variant"]
        if r.get("peak_activation_bytes") and r.get("floor_bytes"):
            r["peak_over_floor"] = r["peak_activation_bytes"] / r["floor_bytes"]


def _ratios_to_naive(r: dict, base: dict) -> None:
    if r.get("peak_activation_bytes") and base.get("peak_activation_bytes"):
        r["peak_activation_ratio"] = r["peak_activation_bytes"] / base["peak_activation_bytes"]
        estimated = r.get("estimated") or base.get("estimated") or r.get("predicted")
        r["ratio_basis"] = "estimated" if estimated else "measured"
    if r.get("step_time_s") and base.get("step_time_s"):
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
    if r.get("max_batch") and base.get("max_batch"):
        r["max_batch_ratio"] = r["max_batch"]["max_batch"] / max(1, base["max_batch"]["max_batch"])


# ----------------------------------------------------------------------------- the table
COLUMNS = [
    "model",
    "variant",
    "batch",
    "dtype",
    "act. MiB",
    "vs naive",
    "floor MiB",
    "step ms",
    "vs naive",
    "vs best naive",
    "compile s",
    "max batch",
    "vs naive",
    "note",
]
SUITE_ORDER = ("main", "imagenet", "depth", "scale", "deluge", "deluge-depth")


def _mib(b) -> str:
    return "" if b is None else f"{b / MIB:,.1f}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def _note(r: dict) -> str:
    if r.get("predicted"):
        fit = r["deepest_fitting"]
        held = fit.get("holdout")
        check = (
            f"; the line without depth {held['depth']} predicts it to "
            f"{held['relative_error'] * 100:+.1f} %"
            if held
            else ""
        )
        return f"deepest fitting {fit['budget_bytes'] / (1 << 30):g} GiB, predicted{check}"
    if r.get("estimated"):
        return "estimated"
    if r.get("ratio_basis") == "estimated":
        return "ratio to estimated naive"
    return ""


def table_rows(doc: dict, suites=SUITE_ORDER) -> list[list[str]]:
    """The table's cells, one list per row, in suite order."""
    out = []
    budget = doc["settings"].get("budget_gib")
    rows = [*doc["rows"], *doc.get("derived", [])]
    for suite in suites:
        for r in rows:
            if r.get("suite") != suite:
                continue
            head = [
                r.get("model_label", r["model"]),
                r["variant"],
                str(r["batch"]),
                r.get("dtype", ""),
            ]
            if r.get("error") or r.get("skipped"):
                note = "error: " + r["error"][:60] if r.get("error") else "skipped: " + r["skipped"]
                out.append([*head, *[""] * (len(COLUMNS) - 5), note])
                continue
            mb = r.get("max_batch")
            t = r.get("step_time_s")
            out.append(
                [
                    *head,
                    _mib(r.get("peak_activation_bytes")),
                    _ratio(r.get("peak_activation_ratio")),
                    _mib(r.get("floor_bytes")),
                    "" if t is None else f"{t * 1e3:,.0f}",
                    _ratio(r.get("step_time_ratio")),
                    _ratio(r.get("step_time_vs_best_naive")),
                    "" if r.get("compile_s") is None else f"{r['compile_s']:.0f}",
                    "" if not mb else f"{mb['max_batch']} @ {budget:g} GiB",
                    _ratio(r.get("max_batch_ratio")),
                    _note(r),
                ]
            )
    return out


def render_text(doc: dict) -> str:
    """The table as aligned text, a blank line between suites and between models."""
    groups = [(suite, table_rows(doc, (suite,))) for suite in SUITE_ORDER]
    rows = [r for _, suite_rows in groups for r in suite_rows]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    for _, suite_rows in groups:
        last = None
        for r in suite_rows:
            if r[0] != last and len(out) > 2:
                out.append("")
            out.append(line(r))
            last = r[0]
    return "\n".join(out)


def render_markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"### Benchmark: {doc['device_name']}",
        "",
        f"torch {doc['torch_version']}, commit `{doc['git_commit']}`, {doc['created']}; "
        f"measuring took {doc['measuring_seconds']:.0f} s. "
        "Activation memory = peak live bytes during one full training step (forward, loss, "
        f"backward, SGD step) above the bytes held before it; {doc['memory_method']}. "
        f"Step time = {doc['time_method']} after warm-up. Floor = sum over dense blocks of "
        "N*H*W*C_total*bytes (DelugeNets: every stage's slots, N*H*W*S*C*bytes). "
        "Max batch: largest batch whose measured activation memory fits "
        f"{s.get('budget_gib', 0):g} GiB. Ratios are to the naive model measured in the same "
        'run; "vs best naive" to the fastest of the naive peers run (naive, channels_last, '
        "compiled, and on CUDA each captured in a CUDA graph). Compile s: the first step's "
        "time beyond a steady-state step (compiled variants). -graph rows: the whole step "
        "replayed from a CUDA graph, timed only (a replay allocates nothing; memory as the "
        "row without -graph).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in table_rows(doc):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    if doc.get("estimator_check"):
        errs = ", ".join(
            f"{e['variant']} {e['relative_error'] * 100:+.1f} %" for e in doc["estimator_check"]
        )
        lines += ["", f"Estimator (FakeTensor; rows marked estimated) vs the probe: {errs}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- files
def merge(docs: list[dict]) -> dict:
    """One document from several runs on the same machine (e.g. one suite per device call)."""
    names = {d["device_name"] for d in docs}
    if len(names) != 1:
        raise SystemExit(f"refusing to merge results of different machines: {sorted(names)}")
    doc = dict(docs[0])
    doc["rows"] = _latest_rows([r for d in docs for r in d["rows"]])
    doc["derived"] = [r for d in docs for r in d.get("derived") or []]
    doc["estimator_check"] = [e for d in docs for e in d.get("estimator_check") or []]
    doc["measuring_seconds"] = sum(d["measuring_seconds"] for d in docs)
    doc["settings"] = {k: v for d in reversed(docs) for k, v in d["settings"].items()}
    doc["git_commit"] = ", ".join(dict.fromkeys(d["git_commit"] for d in docs))
    doc["command"] = " + ".join(d["command"] for d in docs)
    doc["merged_from"] = [d["created"] for d in docs]
    doc["complete"] = all(d.get("complete", True) for d in docs)
    add_ratios(doc["rows"])
    return doc


def _latest_rows(rows: list[dict]) -> list[dict]:
    """One row per measurement (suite, model, variant, batch, dtype): a later run's row
    replaces an earlier one, unless the later one was skipped or failed and the earlier one
    was not (a re-run of what a device call's deadline cut off fills the gap)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (*_group_key(r), r.get("variant"))
        old = out.get(key)
        if old is None or not _incomplete(r) or _incomplete(old):
            out[key] = r
    return list(out.values())


def _incomplete(r: dict) -> bool:
    return bool(r.get("skipped") or r.get("error"))


def unused_path(folder: Path, stem: str, suffix: str = ".json") -> Path:
    """``folder/<stem><suffix>``, or ``<stem>b``, ``<stem>c``, ... when that is taken: a second
    run of a day never overwrites a result already written (and perhaps cited)."""
    path = folder / f"{stem}{suffix}"
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if not path.exists():
            return path
        path = folder / f"{stem}{letter}{suffix}"
    raise FileExistsError(f"{folder}: every name {stem}[b-z]{suffix} is taken")


def device_slug(device: str, name: str) -> str:
    """``cpu``, or ``cuda-<gpu name>``: the file stem's first part."""
    if device == "cpu":
        return "cpu"
    return device + "-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_partial(doc: dict, out: Path, stem: str) -> Path:
    """The document so far, rewritten after every job: a run cut short keeps its rows."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.partial.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def write_outputs(doc: dict, out: Path, stem: str, plots: bool = True) -> int:
    """JSON, markdown and plots of ``doc`` into ``out``; prints the table. Returns the exit
    status: 1 if any job failed."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.partial.json").unlink(missing_ok=True)
    (out / f"{stem}.md").write_text(render_markdown(doc))
    made = _plots(doc, out, stem) if plots else []
    print()
    print(render_text(doc))
    print()
    print(
        f"measuring took {doc['measuring_seconds']:.0f} s ({len(doc['rows'])} jobs); wrote "
        f"{json_path}, {out / (stem + '.md')}" + "".join(f", {p}" for p in made)
    )
    errors = [r for r in doc["rows"] if r.get("error")]
    for r in errors:
        print(
            f"ERROR {r['model']} {r['variant']}: {r['error']}\n{r.get('stderr_tail', '')}",
            file=sys.stderr,
        )
    return 1 if errors else 0


def _plots(doc: dict, out: Path, stem: str) -> list[Path]:
    try:
        from bench.plots import plot_all
    except ImportError as exc:  # matplotlib is optional (e.g. a bare GPU image)
        print(f"plots skipped: {exc}")
        return []
    return plot_all(doc, out, stem)
