from .job_config import JobConfig
from .manager import ConfigError, config_help, config_to_dict, load_config, print_help

__all__ = ["JobConfig", "ConfigError", "config_help", "load_config", "config_to_dict", "print_help"]
