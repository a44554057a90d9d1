"""Plugging calibrl's loss and probes into distributed engines, without a home-made distributed trainer.

- `calibrl.integrations.trl`: `CalibRLTrainer(GRPOTrainer)` and `CalibRLConfig(GRPOConfig)` for TRL 1.16
  (accelerate / DeepSpeed / vLLM generation). Importing it imports TRL.
- `calibrl.integrations.verl`: a policy loss and an advantage estimator for verl 0.9.x, registered by
  `register()`; the module imports without verl installed.

Importing this package imports neither TRL nor verl.
"""
