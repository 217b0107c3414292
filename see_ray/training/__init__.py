"""Distributed training: one expert trained on Ray Train + DeepSpeed (``ray_train``), and the add-expert
pipeline that ``jobs/add_expert.py`` runs as a Ray job (``add_expert``: validate, reconstruct, train, validate,
register, deploy)."""
