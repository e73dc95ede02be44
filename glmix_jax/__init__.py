"""glmix_jax: GLMix / GLNet and ACmix vision backbones in JAX/Flax."""
