"""The Postgres ledger: migrations, the store (orgs, keys, grants) and usage queries."""
