"""The cloud node's distillation: small students from a larger teacher, on public data only.

run.py         the run: student setup, teacher pass, training, resume (:func:`distill`)
config.py      its settings (:class:`DistillConfig`)
prune.py       depth pruning: a student from a subset of the teacher's layers
loss.py        forward / reverse / skew KL on the teacher's top-k logits, plus CE
cache.py       the teacher's logits or answers, cached on disk
checkpoint.py  atomic checkpoints (safetensors + JSON) for an exact resume
eval.py        held-out loss and forward speed
model_card.py  the output folder's README.md and summary
"""
