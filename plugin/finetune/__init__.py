"""Fine-tuning: the "train" step of the lifecycle (collect -> fine-tune -> convert -> serve).

    import plugin
    result = plugin.finetune("default", data="facts.jsonl", output="smollm2-facts")
    result.path                      # an ordinary HF checkpoint: plugin.export(result.path), Engine.from_pretrained
    result.eval_loss_before, result.eval_loss_after, result.placement.reason

Modules: data (read and check the .jsonl), masking (chat template -> ids, prompt masked), placement (GPU bf16
or CPU fp32, never an NPU), trainer (LoRA loop, merge), report (model card, loss curve), run (the whole).
"""

from plugin.finetune.data import ChatDataset, ChatExample, load_chat_jsonl
from plugin.finetune.errors import DataError, FinetuneError
from plugin.finetune.placement import TrainingPlacement, place_training
from plugin.finetune.run import FinetuneResult, finetune
from plugin.finetune.trainer import LoraSettings

__all__ = [
    "ChatDataset",
    "ChatExample",
    "DataError",
    "FinetuneError",
    "FinetuneResult",
    "LoraSettings",
    "TrainingPlacement",
    "finetune",
    "load_chat_jsonl",
    "place_training",
]
