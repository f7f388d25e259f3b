"""The HTTP surface: the token API, the admin API, OpenAPI, dashboards, metrics and
readiness endpoints, and the ops app that mounts them."""
