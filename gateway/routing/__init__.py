"""Routing: path normalisation (security-critical), route templates and the router."""
