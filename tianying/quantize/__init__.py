"""Quantized and low-memory inference: int8/int4 weight-only layers, GPTQ, GPTQ-format checkpoints and a
memory budget that streams layers from disk.

Entry points for `LLM.load`:
- `is_quantized_checkpoint(path)`: config.json carries a `quantization_config` (or quantize_config.json).
- `load_quantized(path, device, dtype) -> (model, cfg)`: read a GPTQ-format checkpoint.
- `apply_quantization(model, "int8" | "int4" | "int4-g64-asym" | None)`: quantize a loaded model in place.
- `load_offloaded(path, memory_limit="2GiB", ...)`: a model whose layers stream within a memory budget.
"""

from tianying.quantize.linear import (
    QuantizeError,
    QuantLinear,
    QuantSpec,
    parse_options,
    parse_spec,
    quantize_model,
    quantized_layers,
)

__all__ = [
    "QuantizeError", "QuantLinear", "QuantSpec", "parse_spec", "parse_options", "quantize_model", "quantized_layers",
    "apply_quantization", "is_quantized_checkpoint", "load_quantized", "save_quantized", "load_offloaded",
    "parse_memory", "load",
]


def apply_quantization(model, spec):  # noqa: ANN001, ANN201 - thin hook; typed in quantize_model
    """Quantize `model` in place per `spec` ("int8", "int4", "int4-g64", "int4-g128-asym", "int8-head", dict,
    QuantSpec; see `parse_options`).

    This is the hook `LLM.load(path, quantize=...)` calls; None leaves the model as it is.
    """
    o = parse_options(spec)
    if o is None:
        return model
    return quantize_model(model, bits=o["bits"], group_size=o["group_size"], sym=o["sym"], lm_head=o["lm_head"])


def load(path, device="cpu", dtype=None, quantize=None, memory_limit=None):  # noqa: ANN001, ANN201
    """(model, cfg) for `LLM.load`: a GPTQ checkpoint as such, else load_model → quantize, or a memory budget."""
    from tianying.quantize import format as _format

    if memory_limit is not None:
        from tianying.quantize.offload import load_with_memory_limit

        return load_with_memory_limit(path, memory_limit, device=device, dtype=dtype, quantize=quantize)
    if _format.is_quantized_checkpoint(path):
        if quantize is not None:
            raise QuantizeError(f"{path} is already quantized; drop quantize={quantize!r}")
        model, cfg = _format.load_quantized(path, device=device, dtype=dtype)
        return model, cfg
    from tianying.checkpoint import load_model

    model, cfg = load_model(path, device=device, dtype=dtype)
    return apply_quantization(model, quantize), cfg


def __getattr__(name: str):  # noqa: ANN202 - lazy re-exports keep `import tianying.quantize` light
    if name in ("is_quantized_checkpoint", "load_quantized", "save_quantized", "read_quantization_config"):
        from tianying.quantize import format as _format

        return getattr(_format, name)
    if name in ("load_offloaded", "parse_memory", "MemoryPlan"):
        from tianying.quantize import offload as _offload

        return getattr(_offload, name)
    if name in ("gptq_quantize",):
        from tianying.quantize import gptq as _gptq

        return getattr(_gptq, name)
    raise AttributeError(f"module 'tianying.quantize' has no attribute {name!r}")
