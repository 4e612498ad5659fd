"""One exception tree, shaped by what the caller does with each branch.

    EtlError                      anything this package raises on purpose
    ├── UsageError                bad options or environment        -> exit 2
    ├── MappingError              bad mapping files (all problems)  -> exit 2
    ├── SourceError               the source database failed        -> exit 1
    │   ├── QueryError            a read failed in the database (SQL, tables, columns)
    │   └── SourceLostError       the connection was lost (transient): the run reconnects
    ├── ApiError                  the Hyperengage API failed        -> exit 1
    │   ├── RetriableApiError     retries exhausted on a transient failure
    │   └── FatalApiError         401/403/404, redirects, non-JSON 2xx: stop at once
    ├── StateError                the state store failed or is foreign/newer -> exit 1
    ├── StoppedError              SIGINT/SIGTERM: stopped after in-flight batches -> exit 1
    └── LockedError               another run holds the lock        -> exit 4

Only `cli.py` turns these into exit codes (see `EXIT_CODES` there). Messages say
what went wrong, where, and how to fix it; they never contain the token.
"""

from __future__ import annotations


class EtlError(Exception):
    """Base of every error this package raises on purpose."""


class UsageError(EtlError):
    """An option, environment variable or file argument is wrong."""


class MappingError(EtlError):
    """One or more mapping files are invalid; `problems` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SourceError(EtlError):
    """The source database could not be read (connection, SQL, permissions)."""


class QueryError(SourceError):
    """One read of a stream failed in the database; `mapping_path`/`stream` say whose,
    `detail` is the driver's first line. The run layer adds what to fix."""

    def __init__(self, message: str, *, mapping_path: str, stream: str, detail: str) -> None:
        super().__init__(message)
        self.mapping_path = mapping_path
        self.stream = stream
        self.detail = detail


class SourceLostError(SourceError):
    """The source connection was lost or refused, or the server is shutting down:
    transient, so the run reconnects and resumes (`source.errors.classify`).
    `detail` is the driver's first line."""

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class ApiError(EtlError):
    """The Hyperengage API did not accept a request."""


class RetriableApiError(ApiError):
    """A transient failure that persisted past the retry budget."""


class FatalApiError(ApiError):
    """A failure no retry can fix (bad token, wrong endpoint, a proxy's HTML page)."""


class StateError(EtlError):
    """The state store is unreachable, corrupted, foreign or from a newer version."""


class LockedError(EtlError):
    """Another `sync`/`backfill` holds the lock on this state store."""


class StoppedError(EtlError):
    """A signal asked the run to stop; it did, after the in-flight batches."""
