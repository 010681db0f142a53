"""SFT attribution on CPU: a character-level GPT pre-trained here on Shakespeare, fine-tuned
on chit-chat prompt/response pairs (loss on response tokens only); retrains fine-tune the
same pre-trained model on alpha-subsets of the pairs."""

from experiments.configs import lm_shakespeare
from stride_jax.job.config import base_config, recipe


def get_config():
    c = base_config("decoder")
    c.data.update(name="chitchat", block_len=64, n_train=1000, n_val=50, n_query=100)
    c.model.source = "pretrain"
    # The pre-trained model's tokenizer is used for the SFT data (unknown characters refused).
    c.data.tokenizer = "pretrained"
    c.train = recipe(steps=200, lr=1e-3, warmup_steps=20)
    c.groundtruth.seeds = 2  # each retention mask fine-tuned with two seeds, losses averaged
    # The baselines take lm_shakespeare's validation-chosen settings, and the same rows: STRIDE
    # at T = N/2 and N/4 of the 2,325 training rows, the paper's recipe. Then STRIDE, EK-FAC
    # and K-FAC take their own choices on the 50 SFT validation pairs (``sft_tuned``).
    lm_shakespeare.tuned_baselines(c)
    lm_shakespeare.comparison_rows(c, half=1162, quarter=580)
    sft_tuned(c)
    lm_shakespeare.opspace_at_stride(c)
    return c


def sft_tuned(c) -> None:
    """Chosen on the SFT validation pairs (two-seed ground truth), each method over the same
    Fisher (empirical / true) x damping (1e-4 / 3e-4 / 1e-3) grid, then the empirical Fisher
    at 3e-3 and 1e-2 (experiments/RESULTS.md). After the true Fisher's labels changed
    (session 10), EK-FAC's true-Fisher row was rerun at 1e-4 to 0.1: 1e-2 is its peak. The
    other baselines keep Shakespeare's."""
    c.stride.kernels.fisher = "empirical"  # the library default's Fisher
    c.stride.stage1.gate_l2 = 3e-3
    # At T = N the default (design.kind and recovery "auto": the interleaved design and the
    # exact solve, 0.52497) and the expander's Lasso (0.52501) tie on validation: 0.00004
    # apart, against 0.0005 between draws of the Fisher's labels. As on Shakespeare, the tie
    # goes to the cheaper: the solve compiles no Lasso (a first call 0.84x / 0.86x EK-FAC's,
    # true / empirical Fisher, against the Lasso's 1.01x / 1.04x: ratios of the means of three
    # first calls, BENCHMARKS.md session 14). The expander's exact solve
    # (0.5244) and kernel recovery (0.5243) score lower. Sessions 13-14.
    # STRIDE at N/2: gate_l2 3e-4 / 1e-3 / 3e-3 / 1e-2 / 3e-2 gave 0.4923 / 0.4948 / 0.4980 /
    # 0.5010 / 0.4991 with the kernel recovery (session 13; TRAK-10 got two more points too).
    c.variants.stride_half.update(recovery="auto", stage1=dict(gate_l2=1e-2))
    c.variants.stride_quarter.update(recovery="auto")
    c.baselines.ekfac.update(fisher="sampled", damping=1e-2)  # the true-Fisher row's best
    c.variants.ekfac_empirical.update(damping=3e-3)
    c.baselines.kfac.update(fisher="empirical", damping=1e-2)  # the grid's edge
