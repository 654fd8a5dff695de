"""The lean decode loop of ``bench_generate.py`` (gpt-fast style): a static cache, the prefill
eager or compiled, then the one-token step compiled and, on a GPU, replayed as one CUDA graph,
which shows what the kernels allow once the host is out of the way."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for ``device``'s work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_lean(
    model, prompt: torch.Tensor, new_tokens: int, device: torch.device, forced: list | None = None,
    options: dict | None = None, compile_prefill: bool = False,
) -> tuple[float, list, float]:  # fmt: skip
    """Seconds for a gpt-fast style greedy loop, the tokens, and the seconds of one decode step
    (the loop after the prefill, per step): static cache, eager prefill, then the one-token step
    compiled (``torch.compile``, no graph break) and, on a GPU, captured once into a CUDA graph
    that every token replays. With ``forced`` tokens, each step takes the forced token before it
    instead of its own prediction (teacher forcing). ``options``: torch.compile's, for the step
    compiled first for this shape; ``compile_prefill``: the prefill compiled too (no CUDA graph),
    as gpt-fast's ``--compile_prefill`` does."""
    from transformers import StaticCache

    batch, length = prompt.shape
    kept = model.__dict__.setdefault("_fourbit_bench_steps", {})
    if (batch, length) not in kept:
        # one cache and one step per shape, reset for each run: the captured step writes into them
        cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)

        def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            # the last position's logits only, as transformers' generate asks (``logits_to_keep``)
            logits = model(token, past_key_values=cache, cache_position=position, use_cache=True,
                           logits_to_keep=1).logits  # fmt: skip
            return logits[:, -1].argmax(-1, keepdim=True)

        def prefill(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return step(tokens, positions)  # a code object of its own: compiled apart from the step

        if compile_prefill:
            prefill = torch.compile(prefill, fullgraph=True, dynamic=False, options=options)
        kept[(batch, length)] = _LeanStep(step, prefill, cache, batch, device, options)
    lean = kept[(batch, length)]
    lean.cache.reset()
    tokens = []
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        token = lean.prefill(prompt, torch.arange(length, device=device))
        tokens.append(token)
        sync(device)
        decode_start = time.perf_counter()
        for step_index, index in enumerate(range(length, length + new_tokens - 1)):
            if forced is not None:
                token = torch.tensor(forced, device=device)[:, step_index : step_index + 1]
            token = lean(token, index)
            tokens.append(token)
    sync(device)
    end = time.perf_counter()
    return end - start, torch.cat(tokens, 1).tolist(), (end - decode_start) / max(1, new_tokens - 1)


class _LeanStep:
    """The compiled one-token step over static input buffers; on a GPU, captured into a CUDA graph
    at its first call. (Inductor's own graphs, ``mode="reduce-overhead"``, skip a step that
    updates a StaticCache passed in: the cache's tensors are mutated inputs.)"""

    def __init__(
        self, step, prefill, cache, batch: int, device: torch.device, options: dict | None = None
    ) -> None:  # fmt: skip
        self.prefill, self.cache, self.device = prefill, cache, device
        self.compiled = torch.compile(step, fullgraph=True, options=options)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None

    def __call__(self, token: torch.Tensor, index: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.fill_(index)
        if self.device.type != "cuda":
            return self.compiled(self.token, self.position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out.clone()

    def _capture(self) -> None:
        """Compile and warm up on a side stream, put the cache back as it was, then capture the
        step once (capturing runs nothing)."""
        saved = [(tensor, tensor.clone()) for tensor in _cache_tensors(self.cache)]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.compiled(self.token, self.position)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for tensor, value in saved:  # undo the warm-up steps (a cache may count its length in a tensor)
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.compiled(self.token, self.position)


def _cache_tensors(cache) -> list[torch.Tensor]:
    """The tensors a StaticCache keeps, on itself and on each of its layers."""
    holders = [cache, *getattr(cache, "layers", ())]
    return [value for holder in holders for value in vars(holder).values() if isinstance(value, torch.Tensor)]
