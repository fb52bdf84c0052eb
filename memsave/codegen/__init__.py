"""memsave.codegen"""
