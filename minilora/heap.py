"""Give the host memory that the process has freed back to the operating system.

glibc's malloc keeps freed heap memory for the process to reuse rather than returning it, and a chunk it
cannot hand back whole (freed memory between allocations still alive) stays resident. The streaming
loader frees a full-precision decoder layer after quantizing it, between the 4-bit layers it keeps, so
over a model of 40 layers the kept-but-free memory grew to a quarter of the loaded model (a 1.1 B-weight
Llama: 1,108 MiB resident after a load holding 871 MiB, peak 1,201 MiB; with a trim after each layer
899 and 992 MiB). `malloc_trim(0)` returns every whole free page of the heap, the middle included
(glibc 2.8 and later, https://man7.org/linux/man-pages/man3/malloc_trim.3.html). Elsewhere (macOS, musl)
there is no such call and this does nothing.
"""

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # a C library that cannot be loaded, or one without malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int  # int malloc_trim(size_t pad)
    return trim


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc); a no-op where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
