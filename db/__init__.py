"""graftq's results database: tables, connections, claims, queries, migrations (imports neither jobs nor worker)."""

#: Where results go when no database URL is given: a SQLite file under the working directory.
DEFAULT_DATABASE_URL = "sqlite:///graftq-data/graftq.db"
