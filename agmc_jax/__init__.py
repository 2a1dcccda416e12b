"""agmc-jax."""
