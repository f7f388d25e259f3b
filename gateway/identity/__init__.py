"""Who is calling: API keys, JWTs, trusted headers and the bad-credential limiter."""
