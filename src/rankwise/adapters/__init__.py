"""Weight-space adapters: one framework where a method is a parameterization of Delta W (``base.py``), an
initialization (``inits.py``) and an optional gradient correction (``corrections.py``); PEFT-format files (``io.py``).

    from rankwise import adapters
    model = adapters.apply(model, method="lora", r=8, alpha=16, target=["q_proj", "v_proj"])
    adapters.save_adapter(model, "out/adapter")          # loads in peft.PeftModel.from_pretrained
"""

from . import adalora, core, lora, nola, randlora, vera  # noqa: F401  (register the parameterizations)
from .base import PARAMETERIZATIONS, AdapterLinear, Parameterization, parameterization
from .corrections import AltLoRA, LoRAPro, LoRAProLite
from .inits import calibration_gradients, init_lora_ga, init_lora_sb, init_pissa
from .inject import (active_parameterizations, adapter_layers, apply, delete_adapter, disable_adapters, find_targets,
                     merge, merge_and_unload, set_adapter, unmerge)
from .io import load_adapter, read_config, save_adapter
from .moe import layers as _moe_layers  # noqa: F401,E402  (register smora / mixlora / flylora for load_adapter)

__all__ = ["PARAMETERIZATIONS", "AdapterLinear", "Parameterization", "parameterization", "AltLoRA", "LoRAPro",
           "LoRAProLite",
           "calibration_gradients", "init_lora_ga", "init_lora_sb", "init_pissa", "active_parameterizations",
           "adapter_layers", "apply", "delete_adapter", "disable_adapters", "find_targets", "merge",
           "merge_and_unload", "set_adapter", "unmerge", "load_adapter", "read_config", "save_adapter"]
