"""reco-jax: pixel-level contrastive learning for semantic segmentation in JAX/Flax."""
