"""Triton kernels of the ddfast ops (installed as ddfast.kernels). Not implemented yet:
importing this backend fails, so ddfast.available_backends() does not list it."""
raise ImportError("the triton backend is not implemented yet")
