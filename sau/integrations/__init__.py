"""SAU inside other training frameworks. Each module imports only what its framework needs
and nothing here is imported by `sau` itself: `sau.integrations.trainer` works with
`transformers.Trainer` and any subclass of it (open-unlearning's trainers among them);
`sau.integrations.open_unlearning.register()` adds SAU variants of open-unlearning's
gradient-based trainers to its registry (their trainer YAMLs ship in
`sau.integrations.configs`)."""
