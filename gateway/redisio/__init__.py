"""Talking to Redis: the auto-pipelined script runners (single node, cluster) on their
connections, RESP encoding, the connection factory and the Lua script loader."""
