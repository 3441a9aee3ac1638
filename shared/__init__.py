"""Everything the labs share that is not a device kernel (see ../DESIGN in the README)."""
