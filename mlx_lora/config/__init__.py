"""Every option of every command: its default and its help text, written once, one dataclass per concern.

Precedence: command line > YAML file (files.py) > the field's default.
"""

from mlx_lora.config.commands import (
    CONVERT_FORMATS,
    EVAL_TASKS,
    ConvertConfig,
    EvalConfig,
    FuseConfig,
    PlotConfig,
    UploadConfig,
)
from mlx_lora.config.data import VALID_NAMES, DataConfig, data_part
from mlx_lora.config.fields import PANELS, arg, field_types, opt, split_list
from mlx_lora.config.files import build_config, load_yaml
from mlx_lora.config.inference import ChatConfig, GenerateConfig, InferenceConfig
from mlx_lora.config.lora import (
    INITS,
    LoRAConfig,
    format_pattern,
    lora_part,
    lora_scale,
    parse_layers,
    parse_pattern,
    pattern_key,
)
from mlx_lora.config.precision import COMPUTE_DTYPES, PrecisionConfig
from mlx_lora.config.serve import API_KEY_ENV, BASE_ID, ServeConfig, parse_adapter_spec
from mlx_lora.config.train import (
    LR_SCHEDULES,
    METHOD_FIELDS,
    OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    REPORT_TO,
    TrainConfig,
    method_options,
)

__all__ = [
    "API_KEY_ENV",
    "BASE_ID",
    "COMPUTE_DTYPES",
    "CONVERT_FORMATS",
    "EVAL_TASKS",
    "INITS",
    "LR_SCHEDULES",
    "METHOD_FIELDS",
    "PANELS",
    "OBJECTIVES",
    "PREFERENCE_OBJECTIVES",
    "REPORT_TO",
    "VALID_NAMES",
    "ChatConfig",
    "ConvertConfig",
    "DataConfig",
    "data_part",
    "EvalConfig",
    "FuseConfig",
    "GenerateConfig",
    "InferenceConfig",
    "LoRAConfig",
    "PrecisionConfig",
    "PlotConfig",
    "ServeConfig",
    "TrainConfig",
    "UploadConfig",
    "arg",
    "build_config",
    "field_types",
    "format_pattern",
    "load_yaml",
    "lora_part",
    "lora_scale",
    "method_options",
    "opt",
    "parse_adapter_spec",
    "parse_layers",
    "parse_pattern",
    "pattern_key",
    "split_list",
]
