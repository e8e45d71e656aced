"""The synthetic backdoor benchmark: faces, triggers, the attacks and the shipped nets.

  faces     a deterministic generator of synthetic face identities
  triggers  backdoor triggers (pure functions on images) and poisoning
  attacks   BadNets and Fine-Pruning's pruning-aware attack, trained with optax
  shipped   the shipped nets and their data, regenerated in the CSAW layout
"""
