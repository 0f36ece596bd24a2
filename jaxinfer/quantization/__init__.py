"""Weight-only quantization: the packed weight type and its packers (kernels live in pallas_kernels/)."""
from jaxinfer.quantization.packers import from_awq, from_gguf, from_gptq, quantize
from jaxinfer.quantization.weight import QuantizedWeight, QuantLayout, dequantize, pack_int4, unpack_int4

__all__ = ["QuantizedWeight", "QuantLayout", "dequantize", "pack_int4", "unpack_int4", "quantize", "from_gptq",
           "from_awq", "from_gguf"]
