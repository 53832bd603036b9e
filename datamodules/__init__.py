"""Manifests, samplers and DataModules."""
