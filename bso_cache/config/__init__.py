"""Typed, frozen configurations: every option of every command, its default, its allowed values and
its help, declared once (fields.py says what each option's metadata tells the rest of the code).

    choices.py    the allowed values (Literal types) and shared defaults
    build.py      BuildConfig (`bso-cache build`)
    train.py      TrainConfig (`bso-cache train`, `sweep`): six sections, the baselines
    commands.py   EvalConfig, VerifyConfig, PlanConfig
"""

from bso_cache.config.build import BuildConfig
from bso_cache.config.choices import (ATTENTION, AUTOCAST, DEFAULT_MAX_LENGTH, DEFAULT_PREFIX_SHARING,
                                      DEFAULT_ROWS_PER_SHARD, DTYPES, FORMATS, OPTIMIZERS, ORIENTATIONS, OVERLONG,
                                      PAIR_MODES, PREFIX_SHARING, SCHEDULES, TEMPLATE_MODES, Attention, Autocast,
                                      DType, Format, GeneratorName, OptimizerName, Orientation, Overlong, PairMode,
                                      PrefixSharing, Schedule, TemplateMode)
from bso_cache.config.commands import (ASHA_GRACE_EVALS, ASHA_REDUCTION, EVAL_DEFAULTS, EvalConfig, PlanConfig,
                                       SweepConfig, VerifyConfig)
from bso_cache.config.fields import OptionInfo, names, option, options, section_names, to_dict
from bso_cache.config.train import BASELINES, REPORTERS, TrainConfig, parse_report_to

__all__ = [
    "BuildConfig", "TrainConfig", "EvalConfig", "VerifyConfig", "PlanConfig", "SweepConfig", "EVAL_DEFAULTS",
    "BASELINES", "ASHA_GRACE_EVALS", "ASHA_REDUCTION", "REPORTERS", "parse_report_to", "OptionInfo", "names", "option", "options", "section_names", "to_dict",
    "ATTENTION", "AUTOCAST", "DEFAULT_MAX_LENGTH", "DEFAULT_PREFIX_SHARING", "DEFAULT_ROWS_PER_SHARD", "DTYPES",
    "FORMATS", "OPTIMIZERS", "ORIENTATIONS", "OVERLONG", "PAIR_MODES", "PREFIX_SHARING", "SCHEDULES",
    "TEMPLATE_MODES", "Attention", "Autocast", "DType", "Format", "GeneratorName", "OptimizerName", "Orientation",
    "Overlong", "PairMode", "PrefixSharing", "Schedule", "TemplateMode",
]
