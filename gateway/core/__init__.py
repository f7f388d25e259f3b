"""Pure helpers every layer may use: ids, errors, periods, the audit-event format, the Redis
key layout, hot-path counters, problem+json, time formatting, shipped resources. The bottom
layer: it imports nothing else of creditgate."""
