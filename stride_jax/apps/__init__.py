"""Command-line apps and report writers built on stride_jax."""
