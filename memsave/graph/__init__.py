"""memsave.graph"""
