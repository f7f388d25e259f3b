"""Metering: admission (one charge.lua call), settlement (batched settle.lua), refusals,
the :class:`~gateway.metering.gate.CreditGate` facade and the ASGI middleware."""
