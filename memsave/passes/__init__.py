"""memsave.passes"""
