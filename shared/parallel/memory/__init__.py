"""Memory savers that every kind of parallelism combines with: activation checkpointing
(Chen et al. 2016) and mixed precision with dynamic loss scaling (Micikevicius et al. 2018)."""
