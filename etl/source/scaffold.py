"""Guess a users and a workspaces stream from the source's tables, and write them as
commented mapping files (`etl init`, SPEC §11).

Pure: it takes the `TableInfo`s `etl.source.introspect` read and returns file
texts. It knows the conventions of the common frameworks (Django's `auth_user`
or a custom `accounts_user`, `date_joined`, first/last names stored as empty
strings; Rails' `users`/`accounts`/`memberships`, naive UTC timestamps,
`discarded_at`) and says in the file what it guessed and what to fill in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from etl.source.introspect import ColumnInfo, TableInfo

# What a value no guess could fill looks like: `etl validate --check-source` reports it
# as an unknown column and lists the table's columns, which says what to write instead.
FILL_IN = "FILL_IN"

USER_MODELS = ("user",)
# Most specific first: a schema with both `accounts` and `teams` syncs the accounts.
WORKSPACE_MODELS = (
    "workspace",
    "organization",
    "organisation",
    "account",
    "org",
    "company",
    "team",
    "tenant",
)
CURSORS = (
    "updated_at",
    "updated",
    "modified_at",
    "modified",
    "last_modified",
    "last_modified_at",
    "date_modified",
    "updated_on",
    "changed_at",
)
EMAILS = ("email", "email_address", "mail", "e_mail")
NAMES = ("name", "full_name", "fullname", "display_name")
FIRST_LAST = (("first_name", "last_name"), ("firstname", "lastname"), ("given_name", "family_name"))
CREATED = (
    "created_at",
    "date_joined",
    "created",
    "inserted_at",
    "created_on",
    "date_created",
    "creation_date",
    "signed_up_at",
    "joined_at",
)
SOFT_DELETES = ("deleted_at", "discarded_at", "removed_at")
OWNERS = ("owner_id", "owner_user_id", "created_by_id", "creator_id", "created_by", "user_id")
LAST_LOGINS = ("last_login", "last_login_at", "last_sign_in_at", "last_seen_at", "last_active_at")
PLANS = ("plan", "plan_name", "tier", "subscription_plan", "pricing_plan")
# Columns never worth a trait: secrets and framework bookkeeping.
_PRIVATE = re.compile(r"password|token|secret|salt|otp|digest|encrypted|lock_version", re.I)
_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
# Words a database would not take as a bare column or table name.
_RESERVED = frozenset({"user", "order", "group", "select", "table", "key", "where", "from", "to"})


@dataclass(frozen=True)
class Draft:
    """One mapping file to write: its name, its text, and what the user must still do."""

    filename: str
    table: str
    text: str
    todo: tuple[str, ...]


@dataclass(frozen=True)
class _Link:
    """How a user reaches a workspace (or a workspace its owner): a column, or SQL."""

    value: str  # a column name, or an SQL expression when `sql`
    sql: bool
    comment: str


def draft_mappings(tables: Sequence[TableInfo], *, dialect: str) -> tuple[Draft, ...]:
    """The users and workspaces mapping files for `tables`, as far as they can be guessed,
    and a track stream (SPEC §10) for each table that looks append-only.

    `dialect` is the SQLAlchemy dialect name (quoting and string concatenation
    differ). Returns no draft when no table looks like a users table.
    """
    users = _users_table(tables)
    if users is None:
        return ()
    workspaces = _workspaces_table(tables, users)
    membership = _membership_table(tables, users, workspaces) if workspaces else None
    sql = _Sql(dialect)
    drafts = [_users_draft(users, workspaces, membership, sql)]
    if workspaces is not None:
        drafts.insert(0, _workspaces_draft(workspaces, users, membership, sql))
        # a membership table with only a creation time is an event too (a user joined)
        taken = {users.name, workspaces.name}
        drafts += [
            _track_draft(table, users, workspaces)
            for table in _append_only_tables(tables, users, workspaces, taken)
        ]
    return tuple(drafts)


# ---------------------------------------------------------------- finding the tables


def _model(table: str) -> str:
    """The singular model name of a table: Django's `accounts_user` -> user,
    Rails' `memberships` -> membership, `companies` -> company."""
    word = table.lower().rsplit(".", 1)[-1].rsplit("_", 1)[-1]
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("ses") or (word.endswith("s") and not word.endswith("ss")):
        return word[:-1]
    return word


def _has(table: TableInfo, names: Sequence[str], kinds: Sequence[str] = ()) -> str | None:
    """The first of `names` that `table` has (of one of `kinds`, if given)."""
    for name in names:
        column = table.column(name)
        if column is not None and (not kinds or column.kind in kinds):
            return name
    return None


def _email(table: TableInfo) -> str | None:
    found = _has(table, EMAILS, ("text",))
    if found:
        return found
    return next(
        (c.name for c in table.columns if "email" in c.name.lower() and c.kind == "text"), None
    )


def _users_table(tables: Sequence[TableInfo]) -> TableInfo | None:
    """The table that most looks like the application's users."""

    def score(table: TableInfo) -> int:
        points = 0
        if _model(table.name) in USER_MODELS:
            points += 10
        if _email(table):
            points += 5
        points += sum(
            1 for c in ("password", "username", "first_name", "last_login") if table.column(c)
        )
        # Django keeps an empty auth_user next to a custom user model (AUTH_USER_MODEL)
        if table.name == "auth_user":
            points -= 1
        return points

    ranked = sorted(tables, key=lambda t: (-score(t), len(t.name), t.name))
    if ranked and score(ranked[0]) >= 10 and _email(ranked[0]):
        return ranked[0]
    return ranked[0] if ranked and _model(ranked[0].name) in USER_MODELS else None


def _workspaces_table(tables: Sequence[TableInfo], users: TableInfo) -> TableInfo | None:
    """The table of workspaces/accounts/organizations, if any."""
    candidates = [
        t
        for t in tables
        if t is not users
        and _model(t.name) in WORKSPACE_MODELS
        and not _refers_to(t, users)  # a user's account (oauth) rather than a workspace
    ]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda t: (
            WORKSPACE_MODELS.index(_model(t.name)),
            _has(t, NAMES) is None,
            len(t.name),
        ),
    )


def _refers_to(table: TableInfo, target: TableInfo) -> str | None:
    """The column of `table` that holds `target`'s id: a foreign key, else the
    conventional `<model>_id` name (`user_id`, `workspace_id`, `account_id`)."""
    for column, referred in table.foreign_keys:
        if referred == target.name:
            return column
    return _has(table, (f"{_model(target.name)}_id",))


def _membership_table(
    tables: Sequence[TableInfo], users: TableInfo, workspaces: TableInfo
) -> TableInfo | None:
    """A table linking users and workspaces (memberships), if any."""
    candidates = [
        t
        for t in tables
        if t is not users
        and t is not workspaces
        and _refers_to(t, users)
        and _refers_to(t, workspaces)
    ]
    return min(candidates, key=lambda t: ("member" not in t.name, len(t.name)), default=None)


# ---------------------------------------------------------------- SQL


class _Sql:
    """Identifiers and string concatenation the way the source's dialect writes them."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def ident(self, name: str) -> str:
        if _PLAIN_IDENTIFIER.fullmatch(name) and name not in _RESERVED:
            return name
        if self.dialect in ("mysql", "mariadb"):
            return "`" + name.replace("`", "``") + "`"
        return '"' + name.replace('"', '""') + '"'

    def full_name(self, first: str, last: str) -> str:
        """First and last name with one space, NULL when both are empty (Django stores
        "" for a blank name): such a user is then invalid, not named " "."""
        a, b = (f"COALESCE({self.ident(c)}, '')" for c in (first, last))
        if self.dialect in ("mysql", "mariadb"):
            joined = f"CONCAT({a}, ' ', {b})"  # || is OR in MySQL
        else:
            joined = f"{a} || ' ' || {b}"
        return f"NULLIF(TRIM({joined}), '')"

    def first_of(self, table: TableInfo, column: str, where: str, outer: TableInfo) -> str:
        """A correlated subquery: the lowest `column` of `table` whose `where` column holds
        the outer row's key."""
        key = outer.primary_key[0] if outer.primary_key else "id"
        return (
            f"(SELECT MIN(m.{self.ident(column)}) FROM {self.ident(table.name)} m "
            f"WHERE m.{self.ident(where)} = {self.ident(outer.name)}.{self.ident(key)})"
        )


# ---------------------------------------------------------------- writing a file


class _Lines:
    """A YAML file being written, with comments."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.todo: list[str] = []

    def add(self, line: str, comment: str = "") -> None:
        self.lines.append(f"{line}  # {comment}" if comment else line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _scalar(value: str) -> str:
    """A YAML 1.2 scalar: plain when that is unambiguous, else double-quoted."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", value) and value.lower() not in (
        "null",
        "true",
        "false",
    ):
        return value
    return json.dumps(value, ensure_ascii=False)


def _key(table: TableInfo, out: _Lines) -> None:
    if table.primary_key:
        key = table.primary_key
        comment = "the primary key"
    elif table.column("id"):
        key, comment = ("id",), "no primary key declared; `id` looks like one"
    else:
        key = (FILL_IN,)
        comment = "TODO: the column(s) that identify one row"
        out.todo.append(f"{table.name}: key: name the column(s) that identify a row")
    value = _scalar(key[0]) if len(key) == 1 else "[" + ", ".join(map(_scalar, key)) + "]"
    out.add(f"key: {value}", comment)


def _cursor(table: TableInfo, out: _Lines) -> ColumnInfo | None:
    name = _has(table, CURSORS, ("datetime", "date", "integer"))
    if name is None:
        out.add(
            "# cursor: updated_at",
            "no updated_at-like column found: every sync reads and diffs every row",
        )
        return None
    out.add(f"cursor: {_scalar(name)}", "rows changed since the last run are read again")
    out.add("lookback: 10m", "re-read window below the watermark (30s, 10m, 2h, 1d)")
    return table.column(name)


def _timezone(table: TableInfo, out: _Lines) -> None:
    naive = [c.name for c in table.columns if c.kind == "datetime" and not c.timezone]
    if naive:
        out.add(
            "timezone: UTC",
            f"zone of naive timestamps ({', '.join(naive[:3])}); Rails and Django store UTC",
        )


def _source(table: TableInfo, sql: _Sql, out: _Lines) -> None:
    out.add("source:")
    out.add(f"  table: {_scalar(table.name)}")
    deleted = _has(table, SOFT_DELETES)
    if deleted:
        out.add(f'  where: "{sql.ident(deleted)} IS NULL"', "soft-deleted rows are left out")


def _field(name: str, link: _Link) -> str:
    if link.sql:
        return f"{name}: {{sql: {json.dumps(link.value, ensure_ascii=False)}}}"
    return f"{name}: {_scalar(link.value)}"


def _other_columns(table: TableInfo, used: set[str], out: _Lines) -> None:
    """The remaining columns as commented-out traits, to pick from."""
    rest = [c for c in table.columns if c.name not in used and not _PRIVATE.search(c.name)]
    if not rest:
        return
    out.add("  # More columns of this table, to send as traits if useful:")
    for column in rest:
        if column.kind == "json":
            out.add(
                f"  # {column.name}: {{sql: ...}}",
                "JSON: pick scalar fields with sql: (objects are not valid traits)",
            )
        elif column.kind in ("binary", "other"):
            continue
        else:
            out.add(f"  # {_scalar(column.name)}: {_scalar(column.name)}")


def _header(table: TableInfo, what: str, out: _Lines) -> None:
    out.add("# yaml-language-server: $schema=mapping.schema.json")
    out.add(f"# {what}, written by `etl init` from the table {table.name}.")
    out.add("# Check it against the database, then look at what would be sent:")
    out.add("#   etl validate --check-source && etl diff")
    out.add("# Every key is explained in docs/mappings.md.")


def _users_draft(
    users: TableInfo, workspaces: TableInfo | None, membership: TableInfo | None, sql: _Sql
) -> Draft:
    out = _Lines()
    _header(users, "Users -> Hyperengage user_identify events", out)
    out.add("stream: users")
    out.add("event_type: user_identify")
    _source(users, sql, out)
    _key(users, out)
    cursor = _cursor(users, out)
    _timezone(users, out)
    key = users.primary_key[0] if users.primary_key else "id"
    out.add(f"user_id: {_scalar(key)}")
    link = _user_workspace(users, workspaces, membership, sql)
    if link is None:
        out.add(f"account_id: {FILL_IN}", "TODO: the column holding the user's workspace id")
        out.todo.append(f"{users.name}: account_id: no workspace table or column found")
    else:
        out.add(_field("account_id", link), link.comment)
    used = {key, *(c.name for c in [cursor] if c)}
    out.add("traits:")
    email = _email(users)
    if email:
        out.add(f"  email: {_scalar(email)}")
        used.add(email)
    else:
        out.add(f"  email: {FILL_IN}", "TODO: the column holding the e-mail address")
        out.todo.append(f"{users.name}: traits.email: no e-mail column found")
    used |= _name_trait(users, sql, out)
    created = _has(users, CREATED, ("datetime", "date"))
    if created:
        out.add(f"  created_at: {{column: {_scalar(created)}, type: datetime}}")
        used.add(created)
    else:
        out.add(f"  created_at: {{column: {FILL_IN}, type: datetime}}", "TODO: the sign-up time")
        out.todo.append(f"{users.name}: traits.created_at: no creation time column found")
    last_login = _has(users, LAST_LOGINS, ("datetime",))
    if last_login:
        out.add(f"  last_login_at: {_scalar(last_login)}")
        used.add(last_login)
    active = _has(users, ("is_active", "active"), ("boolean",))
    if active:
        out.add(f"  is_active: {_scalar(active)}")
        used.add(active)
    used |= {c for c in SOFT_DELETES if users.column(c)}
    if link is not None and not link.sql:
        used.add(link.value)
    _other_columns(users, used, out)
    related = link is not None and link.sql and membership is not None
    if membership is not None and related:
        _related(membership, users, out)
    if membership is not None:
        role = json.dumps(_membership_value(membership, users, "role", sql))
        out.add(f"# A role kept in {membership.name} can be sent too (under traits:), e.g.")
        out.add(f"#   role: {{sql: {role}}}")
        if related:
            out.add("# and the related: entry above re-sends the user when it changes.")
        else:
            out.add(
                "# but a change there does not move this table's cursor: add a related: "
                "entry (docs/modelling.md)."
            )
    return Draft("users.yml", users.name, out.text(), tuple(out.todo))


def _related(membership: TableInfo, users: TableInfo, out: _Lines) -> None:
    """A `related:` entry: a membership change re-sends its user (SPEC §9), since it
    does not move the users table's own cursor."""
    member = _refers_to(membership, users) or "user_id"
    cursor = _has(membership, CURSORS, ("datetime", "date", "integer"))
    if cursor is None:
        out.add(
            f"# {membership.name} has no updated_at-like column: a membership change is only "
            "seen by a full read (full_every, sync --full)."
        )
        return
    out.add(
        "related:",
        f"account_id comes from {membership.name}: its changes re-send the user",
    )
    out.add(f"  - table: {_scalar(membership.name)}")
    out.add(f"    key: {_scalar(member)}", f"the column holding {users.name}.{_key_of(users)}")
    out.add(f"    cursor: {_scalar(cursor)}")


def _key_of(table: TableInfo) -> str:
    return table.primary_key[0] if table.primary_key else "id"


def _membership_value(membership: TableInfo, users: TableInfo, column: str, sql: _Sql) -> str:
    where = _refers_to(membership, users) or "user_id"
    return sql.first_of(membership, column, where, users)


def _name_trait(users: TableInfo, sql: _Sql, out: _Lines) -> set[str]:
    name = _has(users, NAMES, ("text",))
    if name:
        out.add(f"  name: {_scalar(name)}")
        return {name}
    for first, last in FIRST_LAST:
        if users.column(first) and users.column(last):
            out.add(
                f"  name: {{sql: {json.dumps(sql.full_name(first, last))}}}",
                "blank first and last name: NULL, so the record is invalid, not ' '",
            )
            return {first, last}
    username = _has(users, ("username", "login", "handle"), ("text",))
    if username:
        out.add(f"  name: {_scalar(username)}", "no name column found; the user name stands in")
        return {username}
    out.add(f"  name: {FILL_IN}", "TODO: the column (or sql:) holding the person's name")
    out.todo.append(f"{users.name}: traits.name: no name column found")
    return set()


def _user_workspace(
    users: TableInfo, workspaces: TableInfo | None, membership: TableInfo | None, sql: _Sql
) -> _Link | None:
    """The user's workspace: a column of the users table, else their first membership."""
    if workspaces is None:
        return None
    direct = _refers_to(users, workspaces)
    if direct is None:
        # `default_workspace_id`, `current_account_id`: a prefixed link column
        suffix = f"_{_model(workspaces.name)}_id"
        direct = next((c.name for c in users.columns if c.name.endswith(suffix)), None)
    if direct is not None:
        return _Link(direct, sql=False, comment=f"the user's workspace ({workspaces.name})")
    if membership is not None:
        column = _refers_to(membership, workspaces) or FILL_IN
        return _Link(
            _membership_value(membership, users, column, sql),
            sql=True,
            comment=f"via {membership.name}: a user in several workspaces is sent with the "
            "lowest id; users in none are invalid",
        )
    return None


def _workspaces_draft(
    workspaces: TableInfo, users: TableInfo, membership: TableInfo | None, sql: _Sql
) -> Draft:
    out = _Lines()
    _header(workspaces, "Workspaces -> Hyperengage account_identify events", out)
    out.add("stream: workspaces")
    out.add("event_type: account_identify")
    _source(workspaces, sql, out)
    _key(workspaces, out)
    cursor = _cursor(workspaces, out)
    _timezone(workspaces, out)
    key = workspaces.primary_key[0] if workspaces.primary_key else "id"
    owner = _has(workspaces, OWNERS) or _refers_to(workspaces, users)
    used = {key, *(c.name for c in [cursor] if c)}
    if owner:
        out.add(f"user_id: {_scalar(owner)}", "the owner/creator user")
        used.add(owner)
    elif membership is not None:
        member = _refers_to(membership, users) or "user_id"
        where = _refers_to(membership, workspaces) or FILL_IN
        expr = sql.first_of(membership, member, where, workspaces)
        out.add(
            f"user_id: {{sql: {json.dumps(expr)}}}",
            "no owner column: the member with the lowest id stands in",
        )
    else:
        out.add(f"user_id: {FILL_IN}", "TODO: the column holding the owner's user id")
        out.todo.append(f"{workspaces.name}: user_id: no owner column found")
    out.add(f"account_id: {_scalar(key)}")
    out.add("traits:")
    name = _has(workspaces, (*NAMES, "title", "slug"), ("text",))
    if name:
        out.add(f"  name: {_scalar(name)}")
        used.add(name)
    else:
        out.add(f"  name: {FILL_IN}", "TODO: the column holding the workspace's name")
        out.todo.append(f"{workspaces.name}: traits.name: no name column found")
    created = _has(workspaces, CREATED, ("datetime", "date"))
    if created:
        out.add(f"  created_at: {{column: {_scalar(created)}, type: datetime}}")
        used.add(created)
    plan = _has(workspaces, PLANS, ("text",))
    if plan:
        out.add(f"  plan_name: {_scalar(plan)}")
        used.add(plan)
    used |= {c for c in SOFT_DELETES if workspaces.column(c)}
    _other_columns(workspaces, used, out)
    return Draft("workspaces.yml", workspaces.name, out.text(), tuple(out.todo))


# ---------------------------------------------------------------- track streams

# At most this many track streams are offered: the tables most like event logs.
MAX_TRACK_DRAFTS = 5


def _append_only_tables(
    tables: Sequence[TableInfo], users: TableInfo, workspaces: TableInfo, taken: set[str]
) -> list[TableInfo]:
    """Tables that look append-only (a creation time, no updated_at-like column) and
    name a user and a workspace: each row can be one track event (invoices, logins)."""
    found = [
        table
        for table in tables
        if table.name not in taken
        and _has(table, CREATED, ("datetime",))
        and not _has(table, CURSORS)
        and not _has(table, SOFT_DELETES)  # a row that can be deleted is not an event
        and (_refers_to(table, users) or _has(table, OWNERS))
        and _refers_to(table, workspaces)
        and table.primary_key
    ]
    return found[:MAX_TRACK_DRAFTS]


def _track_draft(table: TableInfo, users: TableInfo, workspaces: TableInfo) -> Draft:
    out = _Lines()
    model = _model(table.name)
    _header(table, f"{table.name} -> Hyperengage track events ({model}_created)", out)
    out.add("# The table looks append-only (a creation time, no updated_at): each row is")
    out.add("# sent once, as a track event. The first sync sends no history; send it on")
    out.add(f"# purpose with `etl backfill --stream {model}_created --since 90d`.")
    out.add("# See docs/track.md; check the event name and the properties below.")
    out.add(f"stream: {model}_created")
    out.add("kind: track")
    out.add(f"event_type: {model}_created", "the event's name; or {column: ...} per row")
    out.add("source:")
    out.add(f"  table: {_scalar(table.name)}")
    _key(table, out)
    created = _has(table, CREATED, ("datetime",)) or FILL_IN
    out.add(f"cursor: {_scalar(created)}", "set when the row is written; it must never move")
    out.add(f"timestamp: {_scalar(created)}", "when the event happened, sent as utc_time")
    _timezone(table, out)
    user = _refers_to(table, users) or _has(table, OWNERS) or FILL_IN
    account = _refers_to(table, workspaces) or FILL_IN
    out.add(f"user_id: {_scalar(user)}", f"the user who did it ({users.name})")
    out.add(f"account_id: {_scalar(account)}", f"the workspace ({workspaces.name})")
    used = {*table.primary_key, created, user, account}
    rest = [
        c
        for c in table.columns
        if c.name not in used
        and not _PRIVATE.search(c.name)
        and c.kind in ("text", "integer", "number", "boolean", "datetime", "date")
    ]
    if rest:
        out.add("# properties:", "the columns to send with each event, e.g.")
        for column in rest:
            out.add(f"#   {_scalar(column.name)}: {_scalar(column.name)}")
    return Draft(f"{model}_created.yml", table.name, out.text(), tuple(out.todo))
