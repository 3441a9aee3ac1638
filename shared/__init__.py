"""Everything the labs share that is not a device kernel (docs/architecture.md, "The packages")."""
