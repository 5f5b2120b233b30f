"""FLOPs and memory of a compiled computation, read from XLA."""

import jax


def flops(compiled) -> float:
  """Total FLOPs XLA's cost analysis counts for one call."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of arguments, outputs and temporaries."""
  analysis = compiled.memory_analysis()
  return {
      "argument_bytes": int(analysis.argument_size_in_bytes),
      "output_bytes": int(analysis.output_size_in_bytes),
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "alias_bytes": int(analysis.alias_size_in_bytes),
  }


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
