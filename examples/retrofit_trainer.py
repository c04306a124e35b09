"""Recipe (docs/retrofit.md): Hugging Face Trainer, unchanged but for `memwrap.wrap(model)`.

    python examples/retrofit_trainer.py [--memwrap-optimizer] [--compile] [OUT_DIR]
    torchrun --nproc_per_node 2 examples/retrofit_trainer.py ...      (Trainer runs DDP over 2 processes)

--compile trains with TrainingArguments(torch_compile=True) (backend: $MEMWRAP_COMPILE_BACKEND, default inductor).
"""

import os
import sys
import tempfile

import torch
from _retrofit_common import Tokens, check, tiny_model, token_batches
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import memwrap
from memwrap.trainer import MemwrapCallback


def main():
    use_memwrap_opt = "--memwrap-optimizer" in sys.argv
    compile_kwargs = {}
    if "--compile" in sys.argv:
        compile_kwargs = dict(torch_compile=True, torch_compile_backend=os.environ.get("MEMWRAP_COMPILE_BACKEND",
                                                                                         "inductor"))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else tempfile.mkdtemp()
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2)
    optimizers = (memwrap.optimizer(model, lr=3e-3), None) if use_memwrap_opt else (None, None)
    training_args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                      max_steps=16, learning_rate=3e-3, max_grad_norm=1.0, save_steps=8,
                                      logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, **compile_kwargs)
    trainer = Trainer(model=model, args=training_args, train_dataset=Tokens(), optimizers=optimizers,
                      callbacks=[MemwrapCallback()])  # the callback matters only for resume_from_checkpoint
    trainer.train()
    check([h["loss"] for h in trainer.state.log_history if "loss" in h], "Trainer")
    trainer.save_model(out + "/final")
    if not trainer.is_world_process_zero():  # under torchrun: rank 0 wrote the export and checks it
        return
    plain = AutoModelForCausalLM.from_pretrained(out + "/final")  # plain transformers, no memwrap
    ids = token_batches(1)[0]
    with torch.no_grad():
        model.eval()
        diff = (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    print(f"save_model -> from_pretrained: max |logit difference| {diff}")
    if diff != 0:
        raise SystemExit("exported model differs")


if __name__ == "__main__":
    main()
