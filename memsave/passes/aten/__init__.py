"""Passes on the ATen graph (inference forward, or training forward/backward after the partition):
cleanup, compression (quantize, prune, factorize, fold, release), precision, chunk sizing and
buffer planning."""
