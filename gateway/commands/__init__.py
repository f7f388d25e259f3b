"""The ``creditgate`` command line and what only it composes: the proxy server, the demo,
the sample app, the embedded Postgres, reconcile. The top layer: nothing imports it."""
