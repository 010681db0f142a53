"""lm_shakespeare made tiny for the default test suite (seconds on 2 CPU cores)."""

from stride_jax.job.config import base_config


def get_config():
    c = base_config("decoder")
    c.data.update(block_len=32, n_train=64, n_val=0, n_query=8)
    c.model.update(d_model=16, n_layers=2, n_heads=2, max_len=32)
    c.train.update(steps=40, batch=8, warmup_steps=5)
    c.groundtruth.update(num_models=8, models_per_batch=8)
    c.stride.design.update(num_subsets=32, degree=3)
    # The residual-stream operators with Adam steps after the Gauss-Newton start: the quick
    # runs cover stage 1's checkpoints and resume. The default (kernel operators, closed form)
    # runs end to end in test_lm_benchmark's user-checkpoint test.
    c.stride.hook = "residual"
    c.stride.stage1.update(
        steps=20,
        log_every=10,
        ckpt_every=10,
        warmup_steps=2,
        subsets_per_step=16,
        sketch_dim=4,
        rank=4,
        top_k=4,
    )
    c.stride.op_chunk = 16
    c.stride.lasso.update(maxiter=100)
    c.lds.n_boot = 50
    c.methods = ("stride",)
    return c
