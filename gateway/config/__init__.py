"""The configuration file: schema (:mod:`.schema`), YAML source and ``${VAR}`` expansion
(:mod:`.source`), meaning checks (:mod:`.checks`) and loading (:mod:`.loader`).

The names most code needs are re-exported here: ``from gateway.config import Config``.
"""

from gateway.config.loader import (
    ConfigLocation,
    Mode,
    check_config,
    load_config,
    locate_config,
    parse_config,
    resolve_config_path,
)
from gateway.config.schema import (
    BillingConfig,
    Config,
    FeatureConfig,
    IdentityConfig,
    JwtConfig,
    ParsedRateLimit,
    PlanConfig,
    RateLimitConfig,
    RouteConfig,
    StripeConfig,
    TopUpConfig,
    parse_rate,
)
from gateway.config.source import ConfigError

__all__ = [
    "BillingConfig", "Config", "ConfigError", "ConfigLocation", "FeatureConfig",
    "IdentityConfig", "JwtConfig", "Mode", "ParsedRateLimit", "PlanConfig", "RateLimitConfig",
    "RouteConfig", "StripeConfig", "TopUpConfig", "check_config", "load_config",
    "locate_config", "parse_config", "parse_rate", "resolve_config_path",
]  # fmt: skip
