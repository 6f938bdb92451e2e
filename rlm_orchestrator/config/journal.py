"""Where durable completions are journaled, how long an owner's lease lasts, and how long
journals are kept: `JournalSettings`, and `make_store` / `open_store`, the one place that picks
a store (importing it only then: PostgreSQL's driver is an optional extra).

`store` is one string, as it goes in a TOML file or an environment variable:
- `sqlite:///abs/dir`, `sqlite://~/dir` or `sqlite:relative/dir`: the embedded store, one file
  (journal.db) in that directory; for one server, or several processes on one machine;
- `postgresql://user@host:port/db?sslmode=require` (or `postgres://`; libpq's URL, passed as
  is): shared by server replicas. Better no password in it: libpq reads PGPASSWORD and
  ~/.pgpass (a password given in it is masked by `redacted()`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlm_orchestrator.config.limits import Seconds

if TYPE_CHECKING:
    from rlm_orchestrator.journal.store import JournalStore

DEFAULT_STORE = "sqlite://~/.local/share/rlm-orchestrator/journal"
_SQLITE = "sqlite:"
_POSTGRES = ("postgresql://", "postgres://")

Days = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Bytes = Annotated[int, Field(gt=0)]


class JournalSettings(BaseModel):
    """The journal of durable completions (issue 20)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = DEFAULT_STORE
    # A running completion's owner renews its lease well within this; another server takes
    # the completion over once it has expired (the owner presumed dead).
    lease_seconds: Seconds = 15.0
    # Retention of ended completions (running ones are always kept): by age since they
    # ended, then the oldest ended ones while the store holds more than max_bytes. None: no
    # limit of that kind.
    max_age_days: Days | None = 7.0
    max_bytes: Bytes | None = None
    # PostgreSQL: connections per server process.
    max_connections: int = Field(default=4, ge=1, le=64)

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        value = value.strip()
        if value.startswith(_SQLITE):
            if not _sqlite_path(value):
                raise ValueError("sqlite: needs a directory, e.g. sqlite:///var/lib/rlm/journal")
            return value
        if value.startswith(_POSTGRES):
            return value
        raise ValueError(
            "a journal store is sqlite:///a/directory or postgresql://user@host/database"
        )

    @property
    def kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.store.startswith(_SQLITE) else "postgresql"

    @property
    def directory(self) -> Path:
        """The SQLite store's directory (ValueError for another store)."""
        if self.kind != "sqlite":
            raise ValueError(f"{self.redacted()} is no SQLite store")
        return Path(_sqlite_path(self.store)).expanduser()

    @property
    def max_age_seconds(self) -> float | None:
        return None if self.max_age_days is None else self.max_age_days * 86400.0

    def redacted(self) -> str:
        """`store` fit for a log line: a password in a URL replaced by ***."""
        parts = urlsplit(self.store)
        if parts.password is None:
            return self.store
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))


def _sqlite_path(store: str) -> str:
    """sqlite:///abs -> /abs; sqlite://~/x -> ~/x; sqlite:rel -> rel."""
    rest = store.removeprefix(_SQLITE)
    if rest.startswith("//"):
        rest = rest[2:]
    return rest


def make_store(settings: JournalSettings) -> JournalStore:
    """The store the settings name, not opened yet."""
    if settings.kind == "sqlite":
        from rlm_orchestrator.journal.sqlite import SqliteJournalStore

        return SqliteJournalStore(settings.directory)
    from rlm_orchestrator.journal.postgres import PostgresJournalStore

    return PostgresJournalStore(settings.store, max_connections=settings.max_connections)


async def open_store(settings: JournalSettings) -> JournalStore:
    """The store the settings name, opened (its schema made when new)."""
    store = make_store(settings)
    await store.open()
    return store
