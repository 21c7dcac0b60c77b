"""Plain numpy references of the xla_ops ops: the test oracle (written independently of the C++/CUDA code)."""
