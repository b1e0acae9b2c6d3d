"""Integrations with other libraries' pipelines (diffusers); each imports its library on use."""
