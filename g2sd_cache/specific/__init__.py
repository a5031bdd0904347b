"""Stage 2, specific distillation: the mixed-batch plan, augmentation and mixing, the DeiT loss, the
FineTuner step, `extract-logits`, `finetune` and `evaluate`.
"""
