"""PyTorch Lightning with distsoap's SOAP: ``configure_optimizers`` returns it.

The demo GPT learns the bundled corpus's bytes; one process, or DDP on several (Lightning starts
the extra processes itself; CPU: gloo).

    python launch/lightning/train_lightning.py                   # one process
    python launch/lightning/train_lightning.py --devices 2       # DDP, 2 processes
    python launch/lightning/train_lightning.py --devices 2 --fsdp2   # FSDP2 (ModelParallelStrategy)

Lightning sets up torch.distributed before it calls ``configure_optimizers``, so SOAP sees the
process group and shards its state over the ranks (strategy "ddp", Lightning's DDP averaging the
gradients). Writes ``report.json`` (losses, SOAP's strategy, a parameter checksum) per rank.

Checkpoints use Lightning's own mechanism: ``--checkpoint-dir DIR`` saves one at the end of
every epoch (``--epoch-steps`` batches; each epoch sees the same batches), ``--resume-from
FILE`` resumes from one. Lightning calls ``consolidate_state_dict()`` on every rank before it
saves an optimizer that has one, so rank 0's file holds every rank's SOAP state; nothing needs
adding for distsoap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from distsoap import SOAP
from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig


class ByteBatchDataset(torch.utils.data.IterableDataset):
    """Each rank draws the same global batches and keeps its slice of each."""

    def __init__(self, steps: int, batch: int):
        self.data = ByteBatches(load_corpus(2**18), 32)
        self.steps, self.batch = steps, batch

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        generator = torch.Generator().manual_seed(1)
        share = self.batch // world
        for _ in range(self.steps):
            x, y = self.data.batch("train", self.batch, generator)
            yield x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


class SOAPLanguageModel(L.LightningModule):
    """The demo GPT, trained with SOAP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT(GPTConfig(context=32, n_layers=1, d_model=32, n_heads=2))
        self.losses: list[float] = []

    def configure_model(self):
        """Under ModelParallelStrategy: FSDP2 over its data-parallel mesh (SOAP: "fsdp2")."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        """Next-byte loss of one batch."""
        x, y = batch
        _, loss = self.model(x, y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        """SOAP over every parameter (with a warm-up schedule)."""
        soap = SOAP(self.parameters(), lr=3e-3, betas=(0.95, 0.95), precondition_frequency=10)
        warmup = torch.optim.lr_scheduler.LambdaLR(soap, lambda step: min(1.0, (step + 1) / 5))
        return {"optimizer": soap, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(full(param).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def full(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter (gathered from its shards under FSDP2), detached."""
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()


def main() -> None:
    """Parse the arguments, train, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/lightning"))
    parser.add_argument("--fsdp2", action="store_true", help="ModelParallelStrategy, FSDP2")
    parser.add_argument("--epoch-steps", type=int, default=0, help="batches per epoch")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--resume-from", default=None, help="a Lightning .ckpt to resume from")
    args = parser.parse_args()
    epoch_steps = args.epoch_steps or args.steps
    callbacks = []
    if args.checkpoint_dir:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=args.checkpoint_dir,
                filename="{epoch}",
                every_n_epochs=1,
                save_top_k=-1,
                save_on_train_epoch_end=True,
            )
        )
    module = SOAPLanguageModel()
    strategy = "ddp" if args.devices > 1 else "auto"
    if args.fsdp2:  # FSDP2 without tensor parallelism; saves through DCP, sharded
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(ByteBatchDataset(epoch_steps, 8), batch_size=None)
    trainer.fit(module, loader, ckpt_path=args.resume_from)
    soap = trainer.optimizers[0]
    report = {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "strategy": soap.strategy.name,
        "first_loss": module.losses[0],
        "last_loss": module.losses[-1],
        "steps": trainer.global_step,
        "checksum": float(sum(full(p).double().sum() for p in module.parameters())),
        "weights_sha256": weights_hash(module),
        "state_bytes": soap.state_bytes(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
