"""memsave.ops"""
