"""Trainer YAMLs for open-unlearning (package data): ``trainer/SAUGradAscent.yaml`` and the
others, one per variant that `sau.integrations.open_unlearning.register` adds. A package so
that Hydra can find them as ``pkg://sau.integrations.configs``."""
