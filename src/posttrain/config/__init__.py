"""Config: one typed, frozen record per recipe (``records``) and their loading from YAML with dotted
command-line overrides, every type and range checked on load (``loading``).

May import: ``runtime`` (the metric sinks a config may name). Imports no torch, so ``posttrain --help`` and
config checks stay fast. Everything a caller needs is re-exported here:

    from posttrain.config import load_config, SFTConfig
"""

from posttrain.config.records import (
    ALERT_KINDS,
    DATA_FILE_SUFFIXES,
    DEFAULT_PREFERENCE_BETA,
    PREFERENCE_LOSSES,
    RECIPE_CONFIGS,
    REFERENCE_FREE_LOSSES,
    ConfigError,
    CriticConfig,
    DataConfig,
    DiagnosticsConfig,
    GRPOConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    PreferenceConfig,
    PretrainConfig,
    RewardConfig,
    RewardModelConfig,
    RLConfig,
    SFTConfig,
    TrainConfig,
    VLLMConfig,
    at_least,
    config_from_dict,
    dict_doc,
    doc,
    field_help,
    is_data_file,
    load_config,
    locate_error,
    parse_override,
    read_yaml,
    recipe_help,
    register_recipe_config,
    to_dict,
)

__all__ = ["ConfigError", "at_least", "config_from_dict", "dict_doc", "doc", "field_help", "load_config", "locate_error", "parse_override", "read_yaml", "to_dict", "is_data_file", "ModelConfig", "LoraConfig", "DataConfig", "OptimConfig", "TrainConfig", "VLLMConfig", "PretrainConfig", "SFTConfig", "PreferenceConfig", "RewardConfig", "DiagnosticsConfig", "RLConfig", "GRPOConfig", "RewardModelConfig", "CriticConfig", "PPOConfig", "register_recipe_config", "recipe_help", "DATA_FILE_SUFFIXES", "PREFERENCE_LOSSES", "REFERENCE_FREE_LOSSES", "DEFAULT_PREFERENCE_BETA", "ALERT_KINDS", "RECIPE_CONFIGS"]
