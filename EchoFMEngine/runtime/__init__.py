"""Process-level runtime shared by training, analysis and data preparation: torchrun process groups,
devices, sharding and per-rank generator states. Importing the package imports no torch."""
