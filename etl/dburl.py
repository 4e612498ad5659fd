"""Database URLs as people write them -> the SQLAlchemy URLs of the installed drivers.

`postgres://` (Heroku, Render, Supabase, `DATABASE_URL` conventions) and a bare
`postgresql://` would make SQLAlchemy look for psycopg2, and `mysql://` /
`mariadb://` for mysqlclient; neither is installed. They mean psycopg (3) and
PyMySQL, which are. A URL that names its driver (`postgresql+psycopg://`) is
left as it is.
"""

from __future__ import annotations

from typing import Final

# scheme as written -> scheme with the driver etl installs
_DRIVERS: Final = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def with_driver(url: str) -> str:
    """`url` with a bare scheme replaced by the scheme of the installed driver."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    return f"{_DRIVERS.get(scheme.lower(), scheme)}://{rest}"
