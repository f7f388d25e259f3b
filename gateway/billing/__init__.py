"""Billing: Stripe webhooks mapped to plan changes and top-ups (contract A4)."""
