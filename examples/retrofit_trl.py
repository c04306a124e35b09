"""Recipe (docs/retrofit.md): TRL's SFTTrainer, unchanged but for `memwrap.wrap(model)`; `save_model` writes a
checkpoint that plain transformers loads with equal weights.

    python examples/retrofit_trl.py [OUT_DIR]

TRL computes the loss through its fused LM head (fused_lm_head=True), which reads lm_head.weight directly: memwrap
keeps lm_head exact here (head="exact"; the default head="auto" does too unless a budget plan compresses it, and then
SFTTrainer's call is refused with an error rather than silently not training the head).
"""

import sys
import tempfile

import torch
from _retrofit_common import check, tiny_model
from transformers import AutoModelForCausalLM

import memwrap


def word_tokenizer(vocab: int = 256):
    """A word-level tokenizer over the tokens t0 … t255 (built here: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def dataset(n: int = 16):
    import datasets

    rows = [(torch.arange(24) * (i % 4 + 1) % 254 + 2).tolist() for i in range(n)]  # 4 learnable sequences
    return datasets.Dataset.from_dict({"input_ids": rows})


def main():
    import trl

    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2, head="exact")  # the one added line
    args = trl.SFTConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=12,
                         learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=word_tokenizer())
    trainer.train()
    check([h["loss"] for h in trainer.state.log_history if "loss" in h], "TRL SFTTrainer")
    trainer.save_model(out + "/final")
    plain = AutoModelForCausalLM.from_pretrained(out + "/final")  # plain transformers, no memwrap
    mine = {k: v for k, v in model.state_dict().items()}
    worst = max((plain.state_dict()[k].float() - v.float()).abs().max().item() for k, v in mine.items())
    print(f"save_model -> from_pretrained: {len(mine)} tensors, max |difference| {worst}")
    if sorted(plain.state_dict()) != sorted(mine) or worst != 0:
        raise SystemExit("exported model differs")


if __name__ == "__main__":
    main()
