"""Training stack: data, trainers, distributed setup, evaluation (shared/DESIGN.md)."""
