"""Graph rewrites that decide what trains: LoRA, whole tensors; everything else frozen."""
from pyedge.adapters.lora import LoraConfig, LoraSite, inject_lora
from pyedge.adapters.whole_tensors import select_trainable_tensors

__all__ = ["LoraConfig", "LoraSite", "inject_lora", "select_trainable_tensors"]
