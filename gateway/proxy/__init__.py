"""The reverse proxy: the ASGI app that forwards to the upstream, and the lean upstream
client (standard library and httptools only)."""
