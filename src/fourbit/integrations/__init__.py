"""Optional integrations with other libraries, imported only when used.

- ``fourbit.integrations.transformers``: ``FourbitConfig`` and its quantizer, so that
  ``from_pretrained(..., quantization_config=FourbitConfig())`` loads 4-bit models;
- ``fourbit.integrations.peft``: LoRA and DoRA on fourbit layers, merging into 4-bit or full precision;
- ``fourbit.integrations.model_folder``: which tensors of a transformers checkpoint are Linear or
  ``Conv1D`` weights, from its config.json (what ``fourbit quantize`` quantizes), and the files a
  quantized folder needs to load with ``from_pretrained``.

Nothing here is imported by ``import fourbit``.
"""
