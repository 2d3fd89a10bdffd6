"""Errors of the database layer."""

from __future__ import annotations


class DatabaseError(Exception):
    """The results database cannot be opened or used; the message says which and why."""


class SchemaOutdated(DatabaseError):
    """The database schema is not at the revision this graftq needs; run `graftq db upgrade`."""


class JobNotFound(DatabaseError, LookupError):
    """No job (or batch) has the given id."""
