"""The embedded benchmark around the library: a synthetic TOFU-like corpus, small models
trained on it, evaluation, the unlearning pipeline with its variant registry, sweeps,
reports and quantization for durability. It imports `sau` and `sau_kernels`, never the
command line."""
