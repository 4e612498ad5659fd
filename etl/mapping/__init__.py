"""YAML mapping files -> validated `Mapping` objects (parse, fields, the YAML 1.2 loader)."""
