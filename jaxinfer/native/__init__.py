"""Native CPU kernels, built on this machine on first use and called from jitted code as XLA FFI custom calls."""
