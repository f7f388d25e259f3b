"""Charging AI calls by the tokens the model actually used (contract A8).

Pure and standard-library only (orjson, when installed, decodes faster with the same
answers: :mod:`~gateway.usage.jsonload`), so it can be tested and reused without the
gateway:

- :mod:`~gateway.usage.model`: :class:`Usage`, the provider-neutral token counts.
- :mod:`~gateway.usage.normalize`: each provider's usage object as a :class:`Usage`.
- :mod:`~gateway.usage.prices`: :class:`PriceTable` (``models:``) and the charge.
- :mod:`~gateway.usage.responses`: usage from a buffered JSON response.
- :mod:`~gateway.usage.sse`: :class:`StreamTap`, usage from a stream as it passes.
- :mod:`~gateway.usage.requests`: model, output cap and reserve from a request body, and
  :func:`ensure_stream_usage` for OpenAI streams.
"""

from gateway.usage.model import (
    MAX_TOKENS,
    PROVIDER_MODES,
    PROVIDERS,
    InvalidUsageError,
    Provider,
    Usage,
)
from gateway.usage.normalize import from_anthropic, from_gemini, from_openai, normalize
from gateway.usage.prices import Price, PriceError, PriceTable, charge
from gateway.usage.requests import (
    RequestInfo,
    ensure_stream_usage,
    estimate_reserve,
    inspect_request,
    request_model,
)
from gateway.usage.responses import detect_provider, usage_from_document, usage_from_json
from gateway.usage.sse import StreamTap, usage_from_sse

__all__ = [
    "MAX_TOKENS",
    "PROVIDERS",
    "PROVIDER_MODES",
    "InvalidUsageError",
    "Price",
    "PriceError",
    "PriceTable",
    "Provider",
    "RequestInfo",
    "StreamTap",
    "Usage",
    "charge",
    "detect_provider",
    "ensure_stream_usage",
    "estimate_reserve",
    "from_anthropic",
    "from_gemini",
    "from_openai",
    "inspect_request",
    "normalize",
    "request_model",
    "usage_from_document",
    "usage_from_json",
    "usage_from_sse",
]
