"""The LDS benchmark job, written once for every task kind.

- ``config``: one base config (``base_config(kind)``) and its validation;
- ``models``: what differs by task kind (loading the data, building the base model, the
  ground-truth retrains), as small per-kind functions;
- ``pretrain``: pre-training a decoder here (``model.source='pretrain'``);
- ``cache``: workdir stage caches tied to the config that made them;
- ``benchmark``: the job (data -> task -> base model -> ground truth -> methods -> LDS);
- ``tune``: one tuner on validation queries; ``cli``: the binaries' shared plumbing.
"""
