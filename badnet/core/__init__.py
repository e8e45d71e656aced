"""The core: the DeepID net (model), pruning masks, sharded evaluation, training, several
hosts (distributed), jit with per-backend XLA options (backend) and cached partials (cache)."""
