"""STRIDE: design, steering operators and their sites, stage 1, responses, Lasso recovery."""
