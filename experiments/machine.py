"""What the benchmark scripts report about the machine they ran on: the CPU's fp32 peak and the load average."""
from __future__ import annotations

import os

FLOPS_PER_CYCLE_AVX512 = 64  # per core: 2 FMA pipes x 16 fp32 lanes x 2 flops
FLOPS_PER_CYCLE_AVX2 = 32  # per core: 2 FMA pipes x 8 fp32 lanes x 2 flops
FLOPS_PER_CYCLE_SSE = 8


def cpu_peak() -> tuple[float, str]:
  """(peak fp32 FLOP/s, how it was computed): cores x the nominal clock /proc/cpuinfo reports (turbo not
  assumed) x fp32 flops per cycle of the widest vector ISA with FMA."""
  cores = os.cpu_count() or 1
  ghz, model, isa_flags = 0.0, "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "cpu MHz" and not ghz:
          ghz = float(value) / 1000
        elif key == "model name" and model == "unknown CPU":
          model = value
        elif key == "flags" and not isa_flags:
          isa_flags = set(value.split())
  except (OSError, ValueError):
    pass
  per_cycle, isa = ((FLOPS_PER_CYCLE_AVX512, "AVX-512, 2 FMA units") if "avx512f" in isa_flags else
                    (FLOPS_PER_CYCLE_AVX2, "AVX2 + FMA") if "fma" in isa_flags else (FLOPS_PER_CYCLE_SSE, "SSE"))
  peak = cores * ghz * 1e9 * per_cycle
  return peak, (f"{model}: {cores} cores x {ghz:.2f} GHz (the nominal clock /proc/cpuinfo reports; turbo not "
                f"assumed) x {per_cycle} fp32 flops/cycle ({isa}) = {peak / 1e9:.0f} GFLOP/s")


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them ("?" where it cannot be read)."""
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "?"
