"""The sync job: moves audit events from the Redis shard streams into the Postgres ledger."""
