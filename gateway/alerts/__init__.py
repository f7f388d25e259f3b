"""Alerts before a balance runs out (contract A11): evaluation in the sync job's
transaction, the forecast, the outbox and its deliverer (docs/ARCHITECTURE.md, "Alerts")."""
