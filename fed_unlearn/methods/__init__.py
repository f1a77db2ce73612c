"""Unlearning methods behind one registry (explicit imports, no discovery)."""

from fed_unlearn.methods.base import (
    ClientChannel,
    MissingRequirementError,
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.none import NoneConfig, NoUnlearning
from fed_unlearn.methods.registry import (
    METHOD_REGISTRY,
    get_method,
    list_methods,
    register_method,
)
from fed_unlearn.methods.retrain import Retrain, RetrainConfig

register_method(name="none", config_cls=NoneConfig, method_cls=NoUnlearning)
register_method(name="retrain", config_cls=RetrainConfig, method_cls=Retrain)

__all__ = [
    "METHOD_REGISTRY",
    "ClientChannel",
    "MissingRequirementError",
    "Requirement",
    "UnlearnConfig",
    "UnlearnContext",
    "UnlearnResult",
    "UnlearningMethod",
    "get_method",
    "list_methods",
    "register_method",
]
