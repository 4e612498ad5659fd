"""What a process imports: modules only some commands need stay out of the others
(each import is paid by every run, docs/performance.md "Fixed cost")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import cli_env, copy_mappings, run_cli, seed

# Loaded only by the command or the source that needs them.
LAZY = (
    "psycopg",  # a PostgreSQL source (etl.source.pgtypes)
    "etl.source.pgtypes",
    "etl.run.sample",  # validate --check-source
    "sqlglot",
    "etl.source.introspect",  # init
    "etl.source.scaffold",
    "etl.report.html",  # diff --format html
    "etl.receiver",  # etl receiver
    "etl.run.track",  # track streams
    "etl.run.parallel",  # --workers
    "multiprocessing",
    "etl.run.gone",  # full reads that find gone keys
    "etl.run.dryrun",  # diff, sync --dry-run
    "etl.monitor",  # --metrics-file, --notify-url
    "httpx",  # a run that sends (etl.delivery.load.make_client)
    "jsonschema",  # never at runtime (tests only)
)

PROBE = """
import sys
import sqlalchemy as sa
import etl.cli
from etl.source import drivers
engine = sa.create_engine("sqlite://")
drivers.install(engine)
with engine.connect() as conn:
    conn.execute(sa.text("select 'x'")).scalar_one()
print(",".join(name for name in {lazy!r} if name in sys.modules))
"""


def test_the_cli_and_a_sqlite_source_load_none_of_the_lazy_modules() -> None:
    """Importing the command line and reading a SQLite source loads neither psycopg
    nor the modules of validate, init, the HTML diff, the receiver, track streams,
    worker processes, gone keys, dry runs or monitoring, nor the HTTP client."""
    probe = PROBE.format(lazy=LAZY)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def test_a_sync_with_nothing_to_send_loads_no_http_client(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """A second sync of an unchanged source sends nothing, and its process never
    loads httpx: the HTTP client is made for the first batch."""
    seed(sqlite_url, n_workspaces=1, n_users=2)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    assert run_cli(["sync"], env).exit_code == 0
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['etl', 'sync']\n"
        "try:\n"
        "    runpy.run_module('etl', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'httpx' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.splitlines()[-1] == "exit 0 False", done.stderr


def test_importing_etl_leaves_the_garbage_collector_as_it_was() -> None:
    """etl pauses the cyclic collector while it imports (~45 ms saved), then leaves
    it on if it was on, off if it was off, and freezes nothing: a library import."""
    probe = (
        "import gc, sys\n"
        "before = sys.argv[1] == 'on'\n"
        "gc.enable() if before else gc.disable()\n"
        "import etl\n"
        "print(gc.isenabled() == before, gc.get_freeze_count())\n"
    )
    for state in ("on", "off"):
        done = subprocess.run(
            [sys.executable, "-c", probe, state],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert done.stdout.split() == ["True", "0"]


def test_the_command_line_freezes_what_its_imports_made(tmp_path: Path) -> None:
    """A command's process moves the objects its imports made out of the collector's
    way (gc.freeze), so collections during the run do not walk them again."""
    probe = (
        "import gc, runpy, sys\n"
        f"sys.argv = ['etl', 'state', 'show', '--state', 'sqlite:///{tmp_path / 's.db'}']\n"
        "try:\n"
        "    runpy.run_module('etl', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, gc.get_freeze_count() > 10_000, gc.isenabled())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.splitlines()[-1] == "exit 0 True True", done.stderr
