"""Recipe (docs/retrofit.md): Hugging Face Trainer with a DeepSpeed ZeRO config, unchanged but for `memwrap.wrap(model)`.

    deepspeed --num_gpus 2 examples/retrofit_deepspeed.py [--stage 1|2|3] [OUT_DIR]
    (on a machine without GPUs: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_local_rank ...)

Trains 12 steps saving a checkpoint at step 6, then resumes a second Trainer from that checkpoint to step 12: the resumed
losses must equal the uninterrupted ones. Then `save_model` (ZeRO-3: gathered, stage3_gather_16bit_weights_on_model_save)
loads into plain transformers with the model's own logits.
"""

import os
import sys
import tempfile

import torch
from _retrofit_common import Tokens, check, tiny_model, token_batches
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import memwrap
from memwrap.trainer import MemwrapCallback


def zero_config(stage: int) -> dict:
    """What a user already has: a ZeRO config whose "auto" values the Trainer fills in."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}


def wrapped_model():
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=3)
    return model


def train(model, out: str, stage: int, resume: str | None = None) -> tuple[Trainer, list[float]]:
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2,
                             max_grad_norm=1.0, save_steps=6, lr_scheduler_type="constant",
                             logging_steps=1, report_to=[], disable_tqdm=True,
                             deepspeed=zero_config(stage), save_only_model=False)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[MemwrapCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    stage = int(sys.argv[sys.argv.index("--stage") + 1]) if "--stage" in sys.argv else 2
    args = [a for i, a in enumerate(sys.argv[1:], 1) if not a.startswith("--") and sys.argv[i - 1] != "--stage"]
    out = args[0] if args else tempfile.mkdtemp()
    # Build and wrap before any TrainingArguments(deepspeed=...) exist: with a ZeRO-3 config, transformers builds later
    # models already partitioned (deepspeed.zero.Init), and memwrap wraps whole layers (it says so if you try).
    model, second = wrapped_model(), wrapped_model()
    trainer, losses = train(model, out, stage)
    check(losses, f"Trainer + DeepSpeed ZeRO-{stage}")
    trainer, resumed = train(second, out, stage, resume=os.path.join(out, "checkpoint-6"))
    resumed = resumed[6:]  # the resumed Trainer's history starts with the checkpoint's first 6 steps
    print(f"resumed from checkpoint-6: losses {resumed} vs {losses[6:]}")
    if resumed != losses[6:]:
        raise SystemExit("the resumed run differs from the uninterrupted one")
    trainer.save_model(out + "/final")  # the resumed run's model (equal to the uninterrupted one)
    engine, ids = trainer.model_wrapped, token_batches(1)[0]
    engine.eval()
    with torch.no_grad():  # the trained model, through its engine (ZeRO-3 gathers the shards)
        ours = engine(input_ids=ids).logits
    torch.distributed.barrier()  # every rank past the save: the files are complete before anyone reads them
    if torch.distributed.get_rank() != 0:  # rank 0 checks the export
        return
    unset_hf_deepspeed_config()  # as in a fresh process: otherwise a ZeRO-3 config builds the model partitioned
    plain = AutoModelForCausalLM.from_pretrained(out + "/final")  # plain transformers, no memwrap
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - ours).abs().max().item()
    print(f"save_model -> from_pretrained: max |logit difference| {diff}")
    if diff != 0:
        raise SystemExit("exported model differs")


if __name__ == "__main__":
    main()
