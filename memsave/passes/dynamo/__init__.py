"""Passes on the Dynamo graph (torch-level ops, before AOTAutograd): rewrites that bring their own
backward (chunked loss, attention, MLP) and the tensor- and pipeline-parallel splits."""
