"""HF Transformers Trainer with distsoap's SOAP: as a client optimizer, or from a DeepSpeed JSON.

A tiny GPT-2 (built from a config, nothing downloaded) learns the bundled corpus's bytes.

    python launch/hf/train_trainer.py                                  # SOAP passed to Trainer
    torchrun --nproc_per_node 2 launch/hf/train_trainer.py             # the same, DDP
    torchrun --nproc_per_node 2 launch/hf/train_trainer.py --deepspeed launch/hf/zero2.json

Client optimizer: ``Trainer(optimizers=(SOAP(...), scheduler))``. Build the TrainingArguments
first: it initialises torch.distributed under torchrun, and SOAP built after that shards its
state over the ranks (built before, every rank would hold everything). DeepSpeed: the JSON's
``"optimizer": {"type": "SOAP"}`` resolves because this script imports
``distsoap.integrations.deepspeed`` before the Trainer calls ``deepspeed.initialize``; its
``"lr"`` and ``"betas"`` are ``"auto"``: the Trainer fills them from ``learning_rate`` and
``adam_beta1`` / ``adam_beta2`` (and refuses a JSON that disagrees with them).
Checkpoints: ``--save-steps N`` saves every N steps through the Trainer's own mechanism, and
``--resume-from DIR`` resumes from one. Under DDP the Trainer writes ``optimizer.pt`` from rank 0
only, so the script adds :class:`distsoap.integrations.hf.SOAPCheckpointCallback`, which gathers
every rank's SOAP state onto rank 0 before each save (``--no-soap-callback`` leaves it out, to
show that resuming then fails loudly instead of losing state).
Writes ``report.json`` (losses, SOAP's strategy, a hash of the final weights) into ``--out``
from rank 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from distsoap import SOAP
from distsoap.demo.corpus import load_corpus
from distsoap.integrations.hf import SOAPCheckpointCallback


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of the corpus as causal-LM examples (labels = inputs; the model shifts)."""

    def __init__(self, data: torch.Tensor, context: int, count: int):
        starts = torch.linspace(0, data.numel() - context - 1, count).long()
        self.windows = [data[s : s + context].long() for s in starts.tolist()]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index]
        return {"input_ids": window, "labels": window}


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    """Parse the arguments, train, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config")
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer"))
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--resume-from", default=None, help="a checkpoint-N folder to resume")
    parser.add_argument("--no-soap-callback", action="store_true")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    if args.deepspeed:
        import distsoap.integrations.deepspeed  # noqa: F401  ("type": "SOAP" resolves)

    training_args = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        deepspeed=args.deepspeed,
        seed=0,
        dataloader_drop_last=True,
        # the DeepSpeed JSON's "auto" values (lr, betas) are filled from these
        learning_rate=3e-3,
        adam_beta1=0.95,
        adam_beta2=0.95,
    )
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    dataset = ByteWindows(load_corpus(2**18), context=32, count=512)
    optimizers = (None, None)
    if not args.deepspeed:
        _ = training_args.device  # initialises torch.distributed under torchrun
        soap = SOAP(
            model.parameters(),
            lr=training_args.learning_rate,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
            precondition_frequency=10,
        )
        warmup = LambdaLR(soap, lambda step: min(1.0, (step + 1) / 5))
        optimizers = (soap, warmup)
    callbacks = [] if args.no_soap_callback else [SOAPCheckpointCallback()]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        optimizers=optimizers,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=args.resume_from)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    soap = trainer.optimizer
    soap = getattr(soap, "optimizer", soap)  # accelerate's wrapper
    soap = getattr(soap, "optimizer", soap) if not isinstance(soap, SOAP) else soap
    if trainer.is_deepspeed_enabled:
        soap = trainer.model_wrapped.basic_optimizer
    report = {
        "optimizer": type(soap).__name__,
        "strategy": soap.strategy.name,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": trainer.state.global_step,
        "weights_sha256": weights_hash(model),
    }
    if trainer.is_world_process_zero():
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report))
        print(json.dumps(report))


if __name__ == "__main__":
    main()
