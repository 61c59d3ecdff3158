"""Model loading and compute: GGUF files, shards, stages (MLX or ggml), sampling."""

import os

# ggml's CPU kernels run on OpenMP (libgomp, which reads this once, when ggml is loaded).
# Left to itself, a thread waiting at one of ggml's barriers spins ~3 ms before sleeping,
# unless the process has more OpenMP threads than CPUs: then ~1 us. A shim computes on a
# worker thread, which tips it into the short spin; a process computing on its main thread
# does not, and on cores shared with anything else (the shim's event loop, its client, other
# programs) that spinning takes the time the other ggml thread needs to reach the barrier.
# Sleeping waits give every process the same, steady behaviour; either variable set by the
# user wins.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
