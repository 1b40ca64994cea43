"""Small helpers at the bottom of the project: errors, config checking, crash-safe files, resume policy, seeding,
metric sums, torchrun helpers."""
