"""Talking to Redis: the auto-pipelined script runner (single node and cluster), the
connection factory and the Lua script loader."""
