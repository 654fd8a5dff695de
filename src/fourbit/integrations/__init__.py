"""Optional integrations with other libraries, imported only when used.

- ``fourbit.integrations.transformers``: ``FourbitConfig`` and its quantizer, so that
  ``from_pretrained(..., quantization_config=FourbitConfig())`` loads 4-bit models;
- ``fourbit.integrations.peft``: LoRA and DoRA on fourbit layers, merging into 4-bit or full precision.

Nothing here is imported by ``import fourbit``.
"""
