"""The bridge's TOML configuration: its shape (:mod:`.schema`) and how a file is loaded and checked (:mod:`.loader`)."""

from service.config.loader import (
    ConfigError,
    ConfigProblem,
    backend_decides_turns,
    load_config,
    overrides_problem,
    parse_config,
)
from service.config.schema import (
    PLATFORM_ALIASES,
    AsrConfig,
    Config,
    DevicesConfig,
    HomeAssistantConfig,
    LogConfig,
    MetricsConfig,
    MqttConfig,
    SessionConfig,
    VadConfig,
    parse_listen,
)

__all__ = [
    "PLATFORM_ALIASES",
    "AsrConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DevicesConfig",
    "HomeAssistantConfig",
    "LogConfig",
    "MetricsConfig",
    "MqttConfig",
    "SessionConfig",
    "VadConfig",
    "backend_decides_turns",
    "load_config",
    "overrides_problem",
    "parse_config",
    "parse_listen",
]
