"""Unlearning methods behind one registry (explicit imports, no discovery)."""

from fed_unlearn.methods.base import (
    ClientChannel,
    ClientFailure,
    MissingRequirementError,
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.fed_eraser import FedEraser, FedEraserConfig
from fed_unlearn.methods.fed_recovery import FedRecovery, FedRecoveryConfig
from fed_unlearn.methods.fedosd import FedOSD, FedOSDConfig
from fed_unlearn.methods.foul import Foul, FoulConfig, FoulServer, FoulServerConfig
from fed_unlearn.methods.local_unlearn import LocalUnlearn, LocalUnlearnConfig
from fed_unlearn.methods.mpu import MPU, MPUConfig
from fed_unlearn.methods.none import NoneConfig, NoUnlearning
from fed_unlearn.methods.ortho_lora import OrthoLora, OrthoLoraConfig
from fed_unlearn.methods.pga import PGA, PGAConfig
from fed_unlearn.methods.registry import (
    METHOD_REGISTRY,
    get_method,
    list_methods,
    register_method,
)
from fed_unlearn.methods.retrain import Retrain, RetrainConfig
from fed_unlearn.methods.sfu import SFU, SFUConfig
from fed_unlearn.methods.simu import Simu, SimuConfig
from fed_unlearn.methods.ssiuu import Ssiuu, SsiuuConfig

register_method(name="none", config_cls=NoneConfig, method_cls=NoUnlearning)
register_method(name="retrain", config_cls=RetrainConfig, method_cls=Retrain)
register_method(name="foul", config_cls=FoulConfig, method_cls=Foul)
register_method(name="foul_server", config_cls=FoulServerConfig, method_cls=FoulServer)
register_method(name="fedosd", config_cls=FedOSDConfig, method_cls=FedOSD)
register_method(name="mpu", config_cls=MPUConfig, method_cls=MPU)
register_method(
    name="local_unlearn", config_cls=LocalUnlearnConfig, method_cls=LocalUnlearn
)
register_method(
    name="fed_recovery", config_cls=FedRecoveryConfig, method_cls=FedRecovery
)
register_method(name="fed_eraser", config_cls=FedEraserConfig, method_cls=FedEraser)
register_method(name="simu", config_cls=SimuConfig, method_cls=Simu)
register_method(name="pga", config_cls=PGAConfig, method_cls=PGA)
register_method(name="sfu", config_cls=SFUConfig, method_cls=SFU)
register_method(name="ssiuu", config_cls=SsiuuConfig, method_cls=Ssiuu)
register_method(name="ortho_lora", config_cls=OrthoLoraConfig, method_cls=OrthoLora)

__all__ = [
    "METHOD_REGISTRY",
    "ClientChannel",
    "ClientFailure",
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
