"""`make bench` (`python -m bench.run`): etl against a naive script, on PostgreSQL (SPEC §8).

How to run it:

    make bench                                     # 1,000,000 users, 100,000 workspaces
    BENCH_USERS=100000 make bench                  # a quick look (a few minutes)

It needs the PostgreSQL server on 127.0.0.1:5432 (user postgres, trust auth;
override with BENCH_PG_DSN="host=... port=... user=..."). It creates a fresh
database `etl_bench_<pid>_<time>`, seeds it (bench/seed.py; workspaces = users/10),
writes mapping files for it, and measures four cases. Each case runs etl and
the naive script (bench/naive.py) in turn, BENCH_PAIRS times (default 3), each
run its own process against its own cheap sink (bench/sink.py: parses and
counts, stores nothing, so the client's own cost is what is compared):

    full load      etl backfill (a fresh state each time)   vs  naive: read all -> post all
    no change      etl sync                                 vs  naive --since-last
    sync --full    etl sync --full, nothing changed         vs  naive full (rows/s)
    1% churn       etl sync after 1% of users changed       vs  naive --since-last
                   (each pair gets its own 1%; the previous pair's changes are aged
                   out of both tools' windows first)

Then the database and the temporary directory are dropped, whatever happened.

How to read it: every figure is the median over the pairs. `wall s` is the
whole process, start-up included, for both sides; `rows` is what the run read
(etl: the sum of `read` over its `stream.done` log lines; naive: its own
count); `requests` what the sink saw; `CPU s` the process's own user+system
time (os.wait4) and `sink CPU s` the sink's during that run; `RSS MB` the
process's own peak. `ratio` is the median of the pair-by-pair ratios: rows/s
etl / naive for full reads (higher is better), wall etl / naive for incremental
runs (lower is better). Pair-by-pair ratios hold up when the machine's speed
drifts between pairs (it is shared). The issue's targets follow, PASS/FAIL
each, and the whole table is written as JSON to /tmp/etl-bench-latest.json
(and /tmp/etl-bench-users<N>.json, to compare peak RSS between sizes).

`wide` (no naive pair): etl backfill of a table of wide rows (a 19 KB text, a
jsonb value of 2 KB, a text array: ~23 KB an event) at BENCH_WIDE_ROWS and at 4x
that, to show that peak RSS does not grow with the table or the row width.

Knobs (environment): BENCH_USERS (default 1000000), BENCH_PAIRS (default 3),
BENCH_CASES (comma-separated subset of full,nochange,fullsync,churn,wide; default
all), BENCH_WIDE_ROWS (default 10000),
BENCH_TIMEOUT (seconds per run; default max(600, 3 ms per user)), BENCH_ETL_ARGS
(extra options for every etl sync/backfill, e.g. "--concurrency 4"), BENCH_PG_DSN.
Exit status: 0 when every run finished, 1 when one failed (its stderr tail is
printed); a FAIL target alone does not change it (a report, not a gate —
SPEC §8), unless BENCH_STRICT=1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import measure, seed

TMP = Path(tempfile.gettempdir())  # /tmp
LATEST = TMP / "etl-bench-latest.json"
HISTORY = "etl-bench-users{users}.json"  # in TMP: one per table size, to compare RSS
RSS_LIMIT_MB = 150
CASES = ("full", "nochange", "fullsync", "churn", "wide")


@dataclass
class Run:
    """One measured process."""

    status: str = "not run"
    rows: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    sink_cpu_seconds: float | None = None
    requests: int | None = None
    events: int | None = None
    sent: int | None = None
    peak_rss_mb: float | None = None
    # with worker processes (etl --workers): the parent's and its workers' peak RSS
    # added up, for the stream where that is largest (an upper bound: forked pages
    # are shared); else the process's own
    all_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def rows_per_s(self) -> float | None:
        if not self.ok or not self.rows or not self.seconds:
            return None
        return self.rows / self.seconds


@dataclass
class Case:
    """One comparison: etl and the naive script, run in turn, pair by pair."""

    name: str
    kind: Literal["full", "incremental"]  # compared by rows/s, or by wall time
    etl: list[Run] = field(default_factory=list)
    naive: list[Run] = field(default_factory=list)

    def ratios(self) -> list[float]:
        out = []
        for a, b in zip(self.etl, self.naive, strict=False):
            if not (a.ok and b.ok):
                continue
            if self.kind == "full" and a.rows_per_s and b.rows_per_s:
                out.append(a.rows_per_s / b.rows_per_s)
            elif self.kind == "incremental" and a.seconds and b.seconds:
                out.append(a.seconds / b.seconds)
        return out

    @property
    def ratio(self) -> float | None:
        ratios = self.ratios()
        return round(statistics.median(ratios), 2) if ratios else None

    @property
    def ok(self) -> bool:
        return bool(self.etl and self.naive) and all(r.ok for r in (*self.etl, *self.naive))


def median(runs: Sequence[Run], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if r.ok and getattr(r, attr) is not None]
    return statistics.median(values) if values else None


@dataclass
class Bench:
    """Everything one benchmark run needs: where, with what, for how long."""

    users: int
    workdir: Path
    dbname: str
    env: dict[str, str]
    timeout: float
    etl_args: list[str]

    @property
    def url(self) -> str:
        return seed.source_url(self.dbname)

    def etl(self, args: Sequence[str], *, mappings: str = "mappings", state: str = "") -> Run:
        def argv(endpoint: str) -> list[str]:
            return [
                *(sys.executable, "-m", "etl", *args),
                *("--source", self.url, "--state", f"sqlite:///{state or self.state}"),
                *("--mappings", str(self.workdir / mappings), "--endpoint", endpoint),
                *("--log-format", "json", *self.etl_args),
            ]

        return self._run(argv, _etl_counts)

    @property
    def state(self) -> Path:
        return self.workdir / "state.db"

    def forget_state(self) -> None:
        for path in self.workdir.glob("state.db*"):
            path.unlink()

    def naive(self, args: Sequence[str]) -> Run:
        def argv(endpoint: str) -> list[str]:
            return [
                *(sys.executable, "-m", "bench.naive", "--source", self.url),
                *("--endpoint", endpoint, "--state-file", str(self.workdir / "naive.json")),
                *args,
            ]

        return self._run(argv, _naive_counts)

    def _run(
        self, argv: Callable[[str], list[str]], counts: Callable[[measure.Measured, Run], None]
    ) -> Run:
        result = Run()
        try:
            with measure.Receiver(self.env) as sink:
                run = measure.measure(
                    argv(sink.endpoint), env=self.env, timeout=self.timeout, cwd=self.workdir
                )
                stats = sink.stats()
        except Exception as exc:  # the sink or a stats call failed: report, go on
            result.status = f"failed ({type(exc).__name__}: {exc})"
            return result
        result.seconds = round(run.seconds, 3)
        result.cpu_seconds = round(run.cpu_seconds, 3)
        result.sink_cpu_seconds = _round(sink.cpu_seconds)
        result.peak_rss_mb = round(run.max_rss_kb / 1024, 1)
        result.requests = int(stats.get("requests", 0))
        result.events = int(stats.get("events", 0))
        if run.returncode is None:
            result.status = f"timeout ({self.timeout:g} s)"
        elif run.returncode != 0:
            result.status = f"failed (exit {run.returncode})"
        else:
            result.status = "ok"
        try:
            counts(run, result)
        except (ValueError, KeyError) as exc:
            result.notes.append(f"could not read its counts: {exc}")
        if not result.ok:
            print(f"\n  {result.status} after {run.seconds:.1f} s; stderr tail:")
            print(_indent(run.tail(20) or "(empty)"))
        bad = {k: v for k, v in stats.get("by_status", {}).items() if k != "200"}
        if bad:
            result.notes.append(f"sink answered non-200: {bad}")
        return result


def _etl_counts(run: measure.Measured, result: Run) -> None:
    done = [line for line in measure.json_lines(run.stderr) if line.get("event") == "stream.done"]
    if not done and run.returncode == 0:
        raise ValueError("no stream.done line in its log")
    parts = [line for line in measure.json_lines(run.stderr) if line.get("event") == "stream.parts"]
    result.all_rss_mb = max(
        [result.peak_rss_mb or 0.0]
        + [float(p["parent_rss_mb"]) + sum(float(w) for w in p["peak_rss_mb"]) for p in parts]
    )
    result.rows = sum(int(d["read"]) for d in done)
    result.sent = sum(int(d["sent"]) for d in done)
    invalid = sum(int(d.get("invalid", 0)) for d in done)
    if invalid:
        result.notes.append(f"{invalid} invalid records")
    if run.returncode == 0 and result.events is not None and result.sent != result.events:
        result.notes.append(f"sent {result.sent} but the sink counted {result.events}")


def _naive_counts(run: measure.Measured, result: Run) -> None:
    lines = list(measure.json_lines(run.stdout))
    if not lines:
        raise ValueError("no summary line on its stdout")
    result.rows = int(lines[-1]["rows"])
    result.sent = result.events
    result.all_rss_mb = result.peak_rss_mb


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _show(run: Run) -> str:
    if not run.ok:
        return run.status
    rate = f", {run.rows_per_s:,.0f} rows/s" if run.rows_per_s else ""
    return f"{run.seconds:.2f} s{rate}, {run.peak_rss_mb} MB"


def paired(
    cases: list[Case],
    case: Case,
    *,
    pairs: int,
    etl: Callable[[], Run],
    naive: Callable[[], Run],
    before: Callable[[int], None] | None = None,
) -> None:
    """Run etl then naive, `pairs` times; `before(i)` prepares pair i."""
    cases.append(case)
    for i in range(pairs):
        if before is not None:
            before(i)
        print(f"  {case.name} [{i + 1}/{pairs}] etl ...", end=" ", flush=True)
        case.etl.append(etl())
        print(_show(case.etl[-1]), "| naive ...", end=" ", flush=True)
        case.naive.append(naive())
        print(_show(case.naive[-1]), flush=True)
        if not (case.etl[-1].ok and case.naive[-1].ok):
            break


# ---------------------------------------------------------------- targets


def targets(
    cases: list[Case], history: dict[str, Any] | None, wide: Sequence[tuple[int, Run]] = ()
) -> list[dict[str, Any]]:
    """The issue's targets: PASS, FAIL, or n/a when a case did not run cleanly."""
    by = {c.name: c for c in cases}
    out: list[dict[str, Any]] = []

    def check(name: str, case: str, test: Callable[[Case], tuple[bool, str]]) -> None:
        c = by.get(case)
        if c is None or not c.ok or c.ratio is None:
            out.append({"target": name, "verdict": "n/a", "detail": "its case did not run"})
            return
        passed, detail = test(c)
        out.append({"target": name, "verdict": "PASS" if passed else "FAIL", "detail": detail})

    def rows_ratio(limit: float) -> Callable[[Case], tuple[bool, str]]:
        def test(c: Case) -> tuple[bool, str]:
            ratio = c.ratio or 0
            a, b = median(c.etl, "rows_per_s") or 0, median(c.naive, "rows_per_s") or 0
            return ratio >= limit, f"{ratio:.2f}x ({a:,.0f} vs {b:,.0f} rows/s)"

        return test

    def wall_ratio(c: Case) -> tuple[bool, str]:
        ratio = c.ratio or 0
        a, b = median(c.etl, "seconds") or 0, median(c.naive, "seconds") or 0
        return ratio <= 1.0, f"{ratio:.2f}x ({a:.2f} s vs {b:.2f} s)"

    check("full backfill rows/s >= 1.5x naive full load", "full load", rows_ratio(1.5))
    check("1% churn sync wall <= naive incremental", "1% churn", wall_ratio)
    check("no-change sync wall <= naive incremental", "no change", wall_ratio)
    check("sync --full (no change) rows/s >= 3x naive full", "sync --full", rows_ratio(3.0))
    runs = [(c.name, r) for c in cases for r in c.etl if r.ok and r.peak_rss_mb]
    runs += [(f"wide rows, {n:,}", r) for n, r in wide if r.ok and r.peak_rss_mb]
    if runs:
        name, worst = max(runs, key=lambda x: x[1].peak_rss_mb or 0)
        rss = worst.peak_rss_mb or 0
        detail = f"max {rss} MB a process ({name}); limit {RSS_LIMIT_MB} MB"
        passed = rss <= RSS_LIMIT_MB
        together = max((r.all_rss_mb or 0) for _, r in runs)
        if together > rss:
            detail += f"; parent + workers added up: max {together} MB"
        if history:
            other = history["users"], history.get("max_etl_rss_mb") or 0
            detail += f"; {other[0]:,} users: max {other[1]} MB"
        out.append(
            {"target": f"peak RSS <= {RSS_LIMIT_MB} MB", "verdict": "PASS" if passed else "FAIL"}
            | {"detail": detail}
        )
    return out


# ---------------------------------------------------------------- printing


def table(cases: list[Case]) -> str:
    header = (
        *("case", "who", "rows", "wall s", "rows/s", "CPU s", "sink CPU s", "requests"),
        *("RSS MB", "all MB", "ratio (median of pairs)"),
    )
    rows: list[tuple[str, ...]] = [header]
    for c in cases:
        for who, runs in (("etl", c.etl), ("naive", c.naive)):
            ratio = ""
            if who == "etl":
                ratios = ", ".join(f"{r:.2f}" for r in c.ratios())
                unit = "rows/s" if c.kind == "full" else "wall"
                ratio = f"{c.ratio:.2f}x {unit} ({ratios})" if c.ratio is not None else "n/a"
            failed = next((r.status for r in runs if not r.ok), None)
            rows.append(
                (
                    c.name if who == "etl" else "",
                    who,
                    failed or _num(median(runs, "rows"), "{:,.0f}"),
                    _num(median(runs, "seconds"), "{:.2f}"),
                    _num(median(runs, "rows_per_s"), "{:,.0f}"),
                    _num(median(runs, "cpu_seconds"), "{:.2f}"),
                    _num(median(runs, "sink_cpu_seconds"), "{:.2f}"),
                    _num(median(runs, "requests"), "{:,.0f}"),
                    _num(median(runs, "peak_rss_mb"), "{:.1f}"),
                    _num(median(runs, "all_rss_mb"), "{:.1f}"),
                    ratio,
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            str(c).ljust(w) if i in (0, 1, len(header) - 1) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def other_size(users: int) -> dict[str, Any] | None:
    """The most recent result kept for another table size, to compare peak RSS."""
    kept = []
    for path in TMP.glob(HISTORY.format(users="*")):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if other.get("users") != users and other.get("max_etl_rss_mb"):
            kept.append((path.stat().st_mtime, other))
    return max(kept, key=lambda x: x[0])[1] if kept else None


# ---------------------------------------------------------------- main


def warm_up(env: dict[str, str]) -> None:
    """Import everything once so the byte-code cache is warm for every measured run."""
    code = "import etl.cli, etl.api, bench.naive, bench.sink"
    measure.measure([sys.executable, "-c", code], env=env, timeout=120)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    users = int(os.environ.get("BENCH_USERS", "1000000"))
    timeout = float(os.environ.get("BENCH_TIMEOUT", max(600.0, users * 0.003)))
    etl_args = shlex.split(os.environ.get("BENCH_ETL_ARGS", ""))
    pairs = max(1, int(os.environ.get("BENCH_PAIRS", "3")))
    wanted = [c.strip() for c in os.environ.get("BENCH_CASES", ",".join(CASES)).split(",")]
    unknown = set(wanted) - set(CASES)
    if unknown:
        print(f"BENCH_CASES: unknown {sorted(unknown)} — use some of {', '.join(CASES)}")
        return 2
    started = dt.datetime.now(dt.UTC)
    # Our own secrets and defaults: nothing inherited changes what etl does.
    # Byte-code is cached (outside the tree) as on any real install, even where
    # PYTHONDONTWRITEBYTECODE is set: else every run recompiles etl (~0.2 s).
    skip = ("ETL_", "HYPERENGAGE_", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)} | {
        "HYPERENGAGE_TOKEN": secrets.token_hex(16),
        "HYPERENGAGE_API_KEY": "bench-api-key",
        "HYPERENGAGE_WORKSPACE_KEY": "bench-workspace-key",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "PYTHONPYCACHEPREFIX": str(TMP / "etl-bench-pycache"),
    }
    workdir = Path(tempfile.mkdtemp(prefix="etl-bench-"))
    dbname = f"etl_bench_{os.getpid()}_{int(time.time())}"
    bench = Bench(users, workdir, dbname, env, timeout, etl_args)
    print(
        f"etl benchmark: {users:,} users, {max(1, users // 10):,} workspaces; "
        f"database {dbname}; {pairs} pairs per case; {os.cpu_count()} CPUs, "
        f"load average {_load()} (other work on the machine skews wall times)"
    )
    load_before = _load()
    created = False
    seed_steps: dict[str, float] = {}
    cases: list[Case] = []
    churned: list[int] = []
    wide: list[tuple[int, Run]] = []
    stopped = None
    try:
        seed.create_database(dbname)
        created = True
        seed_steps = seed.seed(dbname, users=users)
        print(f"  seeded in {sum(seed_steps.values()):.1f} s")
        seed.write_mappings(workdir / "mappings")
        warm_up(env)
        # Every case needs the state a backfill leaves and the naive state file.
        if "full" in wanted:
            paired(
                cases,
                Case("full load", "full"),
                pairs=pairs,
                etl=lambda: bench.etl(["backfill"]),
                naive=lambda: bench.naive([]),
                before=lambda _: bench.forget_state(),
            )
        else:
            print("  (not measured) etl backfill + naive full, to set up the state ...")
            bench.etl(["backfill"])
            bench.naive([])
        if "nochange" in wanted:
            paired(
                cases,
                Case("no change", "incremental"),
                pairs=pairs,
                etl=lambda: bench.etl(["sync"]),
                naive=lambda: bench.naive(["--since-last"]),
            )
        if "fullsync" in wanted:
            paired(
                cases,
                Case("sync --full", "full"),
                pairs=pairs,
                etl=lambda: bench.etl(["sync", "--full"]),
                naive=lambda: bench.naive([]),
            )
        if "churn" in wanted:

            def churn(i: int) -> None:
                churned.append(seed.churn(dbname, fraction=0.01, seed_text=f"churn-{i}"))

            paired(
                cases,
                Case("1% churn", "incremental"),
                pairs=pairs,
                etl=lambda: bench.etl(["sync"]),
                naive=lambda: bench.naive(["--since-last"]),
                before=churn,
            )
        if "wide" in wanted:
            wide_rows = int(os.environ.get("BENCH_WIDE_ROWS", "10000"))
            for rows in (wide_rows, 4 * wide_rows):
                seed.seed_wide(dbname, rows=rows, directory=workdir / "wide")
                print(f"  wide rows: etl backfill of {rows:,} rows ...", end=" ", flush=True)
                run = bench.etl(["backfill"], mappings="wide", state=str(workdir / f"w{rows}.db"))
                wide.append((rows, run))
                print(_show(run), flush=True)
    except Exception as exc:  # seeding or churn failed: report what we have
        stopped = f"{type(exc).__name__}: {exc}"
        print(f"\nbenchmark stopped: {stopped}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if created:
            try:
                seed.drop_database(dbname)
            except Exception as exc:
                print(f"could not drop {dbname}: {exc} — drop it by hand")

    history = other_size(users)
    verdicts = targets(cases, history, wide)
    print()
    print(table(cases))
    notes = [
        f"  {c.name} ({who} #{i + 1}): {note}"
        for c in cases
        for who, runs in (("etl", c.etl), ("naive", c.naive))
        for i, r in enumerate(runs)
        for note in r.notes
    ]
    for c in cases:
        if c.name == "sync --full" and any(r.sent for r in c.etl):
            notes.append(f"  sync --full: sent {[r.sent for r in c.etl]} (expected 0)")
    if notes:
        print("\nnotes:\n" + "\n".join(notes))
    if wide:
        print("\nwide rows (~23 KB an event), etl backfill:")
        for rows, run in wide:
            print(f"  {rows:>9,} rows: {_show(run)}")
    print("\ntargets (issue 16):")
    for v in verdicts:
        print(f"  {v['verdict']:<4}  {v['target']:<50} {v['detail']}")
    etl_rss = [r.peak_rss_mb for c in cases for r in c.etl if r.ok and r.peak_rss_mb]
    etl_rss += [r.peak_rss_mb for _, r in wide if r.ok and r.peak_rss_mb]
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "users": users,
        "workspaces": max(1, users // 10),
        "pairs": pairs,
        "churned_users": churned,
        "seed_seconds": {k: round(v, 2) for k, v in seed_steps.items()},
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
        "etl_args": etl_args,
        "cases": [
            {
                "name": c.name,
                "kind": c.kind,
                "ratio": c.ratio,
                "ratios": [round(r, 3) for r in c.ratios()],
                "etl": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in c.etl],
                "naive": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in c.naive],
            }
            for c in cases
        ],
        "wide": [{"rows": rows} | asdict(r) for rows, r in wide],
        "max_etl_rss_mb": max(etl_rss) if etl_rss else None,
        "targets": verdicts,
        "stopped": stopped,
    }
    text = json.dumps(report, indent=2)
    LATEST.write_text(text)
    (TMP / HISTORY.format(users=users)).write_text(text)
    print(f"\nresults: {LATEST} (and {TMP / HISTORY.format(users=users)})")
    failed = stopped is not None or not all(c.ok for c in cases)
    missed = any(v["verdict"] != "PASS" for v in verdicts)
    return 1 if failed or (missed and os.environ.get("BENCH_STRICT") == "1") else 0


if __name__ == "__main__":
    sys.exit(main())
