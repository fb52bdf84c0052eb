"""memsave.memory"""
