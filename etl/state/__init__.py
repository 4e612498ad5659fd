"""The state store: schema, migrations, lock, typed reads and writes."""
