"""Diff reports that scale: invalid first, ids on new records, a limited terminal, and an
HTML page (checked in headless Chromium) that filters, folds and charts."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import cli_env, copy_mappings, run_cli, seed, user_id, user_row, users

from etl.model import DiffRecord, DiffReport, DiffStream
from etl.report.render import render_diff
from etl.settings import DIFF_TERMINAL_LIMIT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(new: int = 30, changed: int = 15) -> DiffReport:
    """Two streams: users with 2 invalid, `changed` changed and `new` new records (the
    invalid ones last, as pages might bring them), workspaces with a few."""
    records = [
        DiffRecord(
            key=f"u{i}",
            kind="new",
            user_id=f"u{i}",
            account_id=f"w{i % 3}",
            traits={"email": f"user{i}@example.com", "name": f"User {i}", "plan": "free"},
        )
        for i in range(new)
    ]
    for i in range(changed):
        changes = {"last_login_at": {"old": "2024-03-01T00:00:00Z", "new": "2024-03-02T00:00:00Z"}}
        if i < changed * 2 // 3:
            changes["plan"] = {"old": "free", "new": "pro"}
        if i < changed // 3:
            changes["role"] = {"old": "member", "new": "admin"}
        records.append(
            DiffRecord(
                key=f"c{i}",
                kind="changed",
                user_id=f"c{i}",
                account_id="w1",
                traits={"plan": "pro"},
                changes=changes,
            )
        )
    records += [
        DiffRecord(key=f"bad{i}", kind="invalid", reason="required trait 'name' is missing")
        for i in range(2)
    ]
    traits = {"last_login_at": changed, "plan": changed * 2 // 3, "role": changed // 3}
    user_stream = DiffStream(
        "users",
        "user_identify",
        {"read": new + changed + 2, "new": new, "changed": changed, "invalid": 2},
        tuple(records),
        changed_traits=traits,
    )
    workspaces = DiffStream(
        "workspaces",
        "account_identify",
        {"read": 4, "new": 3, "gone": 1},
        (
            *(
                DiffRecord(key=f"w{i}", kind="new", user_id="u1", account_id=f"w{i}")
                for i in range(3)
            ),
            DiffRecord(key="w9", kind="gone"),
        ),
    )
    return DiffReport("incremental", (workspaces, user_stream))


def test_text_lists_invalid_first_and_shows_the_ids_of_new_records() -> None:
    """The text report puts invalid records before the others and shows each new or changed
    record's user_id and account_id."""
    text = render_diff(_report(new=2, changed=1), format="text")
    marks = [line[0] for line in text.splitlines() if line[:2] in ("! ", "~ ", "+ ")]
    assert marks[3:] == ["!", "!", "~", "+", "+"]
    assert "+ u1  user_id=u1 account_id=w1" in text
    assert "~ c0  user_id=c0 account_id=w1" in text


def test_markdown_lists_invalid_first_with_ids() -> None:
    """The Markdown report lists invalid records before changed and new, with ids on new."""
    text = render_diff(_report(new=1, changed=1), format="markdown")
    users = text[text.index("### users") :]
    assert users.index("**Invalid**") < users.index("**Changed**") < users.index("**New**")
    assert "- u0 (user\\_id=u0 account\\_id=w0)" in users


@pytest.fixture
def synced(tmp_path: Path, sqlite_url: str, receiver: Any) -> dict[str, str]:
    """40 users synced, then 3 with a new role (one also renamed) and one made invalid."""
    seed(sqlite_url, n_users=40)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    assert run_cli(["sync"], env).exit_code == 0
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        now = sa.func.current_timestamp()
        ids = [user_id(3), user_id(5), user_id(7)]
        conn.execute(users.update().where(users.c.id.in_(ids)).values(role="owner", updated_at=now))
        conn.execute(users.update().where(users.c.id == ids[0]).values(last_name="Byron"))
        conn.execute(
            users.update().where(users.c.id == user_id(30)).values(email=None, updated_at=now)
        )
        # 30 new users, more than a terminal shows
        conn.execute(users.insert(), [_user(i) for i in range(100, 130)])
    engine.dispose()
    return env


def _user(i: int) -> dict[str, Any]:
    return user_row(i, updated_at=dt.datetime.now(dt.UTC))


def test_changed_traits_count_every_changed_record(synced: dict[str, str]) -> None:
    """`changed_traits` counts each trait over all changed records, also those a limit
    leaves out, and the one record listed under --limit 1 is the invalid one."""
    result = run_cli(["diff", "--format", "json", "--limit", "1"], synced)
    stream = next(s for s in json.loads(result.stdout)["streams"] if s["stream"] == "users")
    assert stream["changed_traits"] == {"role": 3, "name": 1}
    assert [r["kind"] for r in stream["records"]] == ["invalid"]
    full = run_cli(["diff", "--format", "json"], synced)
    records = next(s for s in json.loads(full.stdout)["streams"] if s["stream"] == "users")
    new = [r for r in records["records"] if r["kind"] == "new"]
    assert len(new) == 30
    assert {(r["user_id"], r["account_id"]) for r in new} == {
        (user_id(i), _user(i)["workspace_id"]) for i in range(100, 130)
    }


def _on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """`etl ARGS` in a subprocess whose stdout is a pseudo-terminal; what it printed."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "etl", *args],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(main)
    return re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode()).replace("\r\n", "\n")


def test_text_on_a_terminal_is_limited_and_says_how_to_see_all(synced: dict[str, str]) -> None:
    """On a terminal, text lists DIFF_TERMINAL_LIMIT records per stream and names `--all`;
    `--all` lists them all, and so does a pipe."""
    shown = _on_a_terminal(["diff"], synced)
    assert len(re.findall(r"^[+~!] ", shown, re.MULTILINE)) == DIFF_TERMINAL_LIMIT
    total = 30 + 3 + 1
    assert f"… and {total - DIFF_TERMINAL_LIMIT} more not listed" in shown
    assert "`etl diff --all` lists every one" in shown
    everything = _on_a_terminal(["diff", "--all"], synced)
    assert len(re.findall(r"^[+~!] ", everything, re.MULTILINE)) == total
    assert "more not listed" not in everything
    piped = run_cli(["diff"], synced).stdout
    assert len(re.findall(r"^[+~!] ", piped, re.MULTILINE)) == total


# JavaScript run in a copy of the page by Chromium: what a person would see, as JSON.
_PROBE = """
<script>
const visible = (sel) => [...document.querySelectorAll(sel)]
  .filter((e) => e.checkVisibility({contentVisibilityAuto: true})).length;
const out = {};
out.rows = visible("tr.rec");
out.newRows = visible(".kind.new tr.rec");
out.firstKind = document.querySelector("#s2 details.kind").classList[2];
out.bars = [...document.querySelectorAll("#s2 .bar > span")]
  .map((e) => Math.round(e.getBoundingClientRect().width));
out.barNames = [...document.querySelectorAll("#s2 .bar-row .name")].map((e) => e.textContent);
document.getElementById("f-new").checked = false;
out.newRowsUnticked = visible(".kind.new tr.rec");
out.invalidRowsUnticked = visible(".kind.invalid tr.rec");
document.getElementById("f-new").checked = true;
document.getElementById("f-s2").checked = true;
out.workspacesShown = visible("#s1");
out.usersShown = visible("#s2");
document.querySelectorAll("details.rest").forEach((d) => { d.open = true; });
out.rowsUnfolded = visible("tr.rec");
document.body.setAttribute("data-probe", JSON.stringify(out));
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_filters_folds_and_charts_in_headless_chromium(tmp_path: Path) -> None:
    """Rendered by Chromium, the page shows at most 10 rows per kind until unfolded, hides
    a kind or a stream when its filter is changed, and draws one bar per trait in
    proportion to how many changed records change it, most changed first."""
    page = render_diff(_report(new=30, changed=15), format="html")
    assert "<script" not in page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,900",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, dom[-2000:]
    seen = json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))
    # workspaces: 3 new + 1 gone; users: 2 invalid + 10 of 15 changed + 10 of 30 new
    assert seen["rows"] == 3 + 1 + 2 + 10 + 10
    assert seen["newRows"] == 3 + 10
    assert seen["firstKind"] == "invalid"
    assert seen["barNames"] == ["last_login_at", "plan", "role"]
    full, plan, role = seen["bars"]
    assert full > plan > role > 0
    assert abs(plan / full - 10 / 15) < 0.05
    assert abs(role / full - 5 / 15) < 0.05
    assert seen["newRowsUnticked"] == 0
    assert seen["invalidRowsUnticked"] == 2
    assert (seen["workspacesShown"], seen["usersShown"]) == (0, 1)
    assert seen["rowsUnfolded"] == 2 + 15 + 30
