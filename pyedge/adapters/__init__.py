"""Graph rewrites that decide what trains: adapter methods (LoRA, DoRA, ...) on the protocol
of pyedge/adapters/base.py, whole tensors; everything else frozen."""
from pyedge.adapters.base import (AdapterMethod, OpRule, method_by_name, method_for_config,
                                  method_for_peft, methods)
from pyedge.adapters.fourierft import FourierFTConfig
from pyedge.adapters.hra import HRAConfig
from pyedge.adapters.ia3 import IA3Config
from pyedge.adapters.ln_tuning import LNTuningConfig
from pyedge.adapters.lora import LoraConfig, LoraSite, inject_lora
from pyedge.adapters.miss import MissConfig
from pyedge.adapters.vera import VeraConfig
from pyedge.adapters.whole_tensors import select_trainable_tensors

__all__ = ["LoraConfig", "IA3Config", "HRAConfig", "MissConfig", "VeraConfig", "FourierFTConfig", "LNTuningConfig", "LoraSite", "inject_lora", "select_trainable_tensors", "AdapterMethod",
           "OpRule", "method_by_name", "method_for_config", "method_for_peft", "methods"]
