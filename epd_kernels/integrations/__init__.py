"""Integrations with other libraries' pipelines.

- `epd_kernels.integrations.diffusers`: latent text-to-image with a Stable-Diffusion-style
  diffusers pipeline (`sample_pipeline`, `distill_pipeline`, `encode_prompts`).

Each module imports its library only when it is used.
"""
