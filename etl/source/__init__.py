"""Reading the source database: query building, keyset pages, safe horizon, checks, drivers."""
