"""Passes on AOTAutograd's joint forward+backward graph: the partition into forward and backward,
with memsave's recompute planners choosing what is saved."""
