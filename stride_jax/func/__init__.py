"""Pure numerics shared by attribution methods: per-row gradients, projections, layer taps."""
