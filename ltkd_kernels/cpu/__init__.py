"""C++ CPU backend (built by the CPU-backend issue)."""


def unavailable_reason():
    return "the C++ CPU backend is not part of this build yet"


def grouped_kl_ops():
    raise RuntimeError(unavailable_reason())
