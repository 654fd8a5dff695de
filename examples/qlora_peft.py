"""QLoRA end to end with fourbit: load in 4 bits, train LoRA with trl, merge, save, reload.

Runs on the CPU in well under a minute with a tiny random Llama (no download). Point ``--model``
at a real checkpoint folder or Hub name to fine-tune that instead. Needs transformers, peft, trl
and datasets.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from fourbit.integrations.peft import merge_and_unload, register_lora
from fourbit.integrations.transformers import FourbitConfig


def tiny_llama(folder: Path) -> str:
    """Save a small random Llama (float) and a word-level tokenizer of numbers to ``folder``; return its path."""
    torch.manual_seed(0)
    words = models.WordLevel({str(i): i for i in range(256)}, unk_token="0")
    tokenizer = Tokenizer(words)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="0", pad_token="0", eos_token="1").save_pretrained(
        folder / "float"
    )
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "float")
    return str(folder / "float")


def token_dataset(vocab_size: int, rows: int = 64, length: int = 32) -> Dataset:
    """A pre-tokenized dataset of short repeating sequences, so that the loss visibly falls."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab_size - length, (rows,), generator=generator)
    return Dataset.from_dict({"input_ids": [list(range(int(s), int(s) + length)) for s in starts]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or Hub name (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = args.model or tiny_llama(work)

        # 1. Load in 4 bits: every nn.Linear but the output head is quantized as the checkpoint streams in.
        #    A fixed compute dtype: otherwise each layer takes its first input's (bfloat16 under autocast).
        quantization = FourbitConfig(quant_type="nf4", compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)

        # 2. LoRA through peft, with fourbit's LoRA layer registered; trained by trl's SFTTrainer.
        lora = register_lora(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        training = SFTConfig(
            output_dir=str(work / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            logging_steps=max(1, args.steps // 4),
            report_to=[],
            save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=True,
        )
        dataset = token_dataset(model.config.vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(path)
        trainer = SFTTrainer(
            model=model, args=training, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
        )
        result = trainer.train()
        print(f"trained {args.steps} steps, final loss {result.training_loss:.3f}")

        # 3. Merge the adapter into the 4-bit weights (dequantize, add, quantize again).
        merged, report = merge_and_unload(trainer.model)
        print(report)

        # 4. Save and reload: config.json says quant_method "fourbit"; the tensors are bitsandbytes' layout.
        merged.save_pretrained(work / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(work / "merged")
        merged.eval()
        batch = torch.tensor([dataset[0]["input_ids"]], device=merged.device)
        with torch.no_grad():
            same = torch.equal(merged(batch).logits, reloaded(batch.to(reloaded.device)).logits.to(merged.device))
        print(f"reloaded from {work / 'merged'}: logits identical: {same}")
        if not same:
            raise SystemExit("the reloaded model differs from the merged one")


if __name__ == "__main__":
    main()
