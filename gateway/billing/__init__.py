"""Billing: Stripe webhooks mapped to plan changes and top-ups (DESIGN A4)."""
