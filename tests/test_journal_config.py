"""JournalSettings: what a store string may say, and the factory's routing (PostgreSQL's driver
imported only for a PostgreSQL store)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from rlm_orchestrator.config.journal import DEFAULT_STORE, JournalSettings, make_store
from rlm_orchestrator.journal.postgres import PostgresJournalStore
from rlm_orchestrator.journal.sqlite import SqliteJournalStore


@pytest.mark.parametrize(
    ("store", "directory"),
    [
        ("sqlite:///var/lib/rlm/journal", Path("/var/lib/rlm/journal")),
        ("sqlite://~/journal", Path.home() / "journal"),
        ("sqlite:relative/dir", Path("relative/dir")),
        (DEFAULT_STORE, Path.home() / ".local/share/rlm-orchestrator/journal"),
    ],
)
def test_a_sqlite_store_is_a_directory(store: str, directory: Path) -> None:
    settings = JournalSettings(store=store)
    assert settings.kind == "sqlite" and settings.directory == directory
    made = make_store(settings)
    assert isinstance(made, SqliteJournalStore) and made.path == directory / "journal.db"


def test_a_postgresql_store_is_a_url_passed_as_is() -> None:
    url = "postgresql://rlm:s3cret@db.internal:5432/rlm?sslmode=require"
    settings = JournalSettings(store=url, max_connections=8)
    assert settings.kind == "postgresql"
    assert settings.redacted() == "postgresql://rlm:***@db.internal:5432/rlm?sslmode=require"
    made = make_store(settings)
    assert isinstance(made, PostgresJournalStore) and made.dsn == url
    assert JournalSettings(store="postgres://db/rlm").kind == "postgresql"
    with pytest.raises(ValueError, match="no SQLite store"):
        _ = settings.directory


def test_defaults_and_retention() -> None:
    settings = JournalSettings()
    assert settings.lease_seconds == 15.0 and settings.max_bytes is None
    assert settings.max_age_seconds == 7 * 86400.0
    assert JournalSettings(max_age_days=None).max_age_seconds is None


@pytest.mark.parametrize(
    "bad",
    [
        {"store": "mysql://db/rlm"},
        {"store": "/a/plain/path"},
        {"store": "sqlite://"},
        {"lease_seconds": 0},
        {"max_age_days": -1},
        {"max_bytes": 0},
        {"max_connections": 0},
        {"unknown": 1},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        JournalSettings.model_validate(bad)


def test_the_embedded_store_does_not_import_the_postgresql_driver() -> None:
    code = (
        "import sys\n"
        "from rlm_orchestrator.config.journal import JournalSettings, make_store\n"
        "make_store(JournalSettings(store='sqlite:///tmp/x'))\n"
        "print('psycopg' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
