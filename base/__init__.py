"""Base classes the rest builds on: BaseTrainer (epochs, monitoring, checkpoints, exact resume, signals) with the
Parts and Run it is built from, BaseDataLoader (validation split, seeded data order, in-memory fast path) with the
TensorDataset that path reads, BaseModel."""
