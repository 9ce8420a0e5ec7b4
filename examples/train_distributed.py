"""Stage-2 training on torch's own distributed engines, DDP or FSDP2, in one script (gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node 2 examples/train_distributed.py --engine fsdp --out out/fsdp
    torchrun --nproc_per_node 2 examples/train_distributed.py --engine ddp --out out/ddp
    genieblue convert out/fsdp/dcp out/fsdp-hub --config out/fsdp/start --base out/fsdp/start-base

FSDP2 (``fully_shard``) with the wrap policy of the Hugging Face Trainer's FSDP integration: every module whose class
is in the model's ``_no_split_modules`` (every decoder block, the frozen base's included, each SigLIP encoder layer,
the projector) is its own FSDP unit, then the root. The multimodal path runs the base's own block objects, so their
FSDP hooks gather the parameters on both paths. (The Trainer itself shards the same way on GPUs; on CPU, accelerate
runs it as plain multi-process data parallelism, which is why this script exists.) DDP: ``DistributedDataParallel``.

Either way the state is saved with ``torch.distributed.checkpoint``, which ``genieblue convert`` reads. With
``--report FILE``, rank 0 writes what it checked: the sharded model's text logits and multimodal loss against the
unsharded model on the same batch, the losses, and whether the base weights are unchanged after training.
"""

import argparse
import copy
import hashlib
import json
import logging
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from genieblue_hf.synthetic import compose_tiny, shapes_dataset
from genieblue_hf.training import ConversationCollator


def shard_like_the_trainer(model):
    """``fully_shard`` every module of a ``_no_split_modules`` class (the Trainer's FSDP auto-wrap), then the root."""
    classes = {name for m in model.modules() if isinstance(m, PreTrainedModel) for name in m._no_split_modules or ()}
    units = [m for m in model.modules() if type(m).__name__ in classes]
    for module in units:
        fully_shard(module)
    fully_shard(model)
    return units


def base_digest(model):
    """SHA-256 of the base LLM's full state dict (gathered from the shards on every rank)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    digest = hashlib.sha256()
    for key in sorted(k for k in full if k.startswith("language_model.")):
        digest.update(key.encode())
        digest.update(full[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--report", help="rank 0 writes its checks here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("train_distributed")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if cuda else torch.device("cpu")

    model, processor = compose_tiny(seed=0)  # the same start on every rank
    if rank == 0:
        model.save_pretrained(f"{args.out}/start")
        processor.save_pretrained(f"{args.out}/start")
        model.language_model.save_pretrained(f"{args.out}/start-base")
    model.configure_training(stage=2)
    collator = ConversationCollator(processor)
    data = shapes_dataset(args.steps * args.batch_size * world, seed=3)
    probe = {k: v.to(device) for k, v in collator(data[: args.batch_size]).items()}
    text_probe = processor(text=["the quick brown fox", "describe the image"])
    text_probe = {k: v.to(device) for k, v in text_probe.items()}

    reference = copy.deepcopy(model).to(device).eval()  # unsharded, for the checks below
    with torch.no_grad():
        expected_text = reference(**text_probe).logits
        expected_loss = reference(**probe).loss
    del reference
    before = None

    model.to(device)
    if args.engine == "fsdp":
        units = shard_like_the_trainer(model)
        trained = model
        log.info("FSDP units: %d (%s)", len(units), sorted({type(m).__name__ for m in units}))
    else:
        trained = DistributedDataParallel(model)
    if args.engine == "fsdp":
        before = base_digest(model)
    model.eval()
    with torch.no_grad():
        sharded_text = trained(**text_probe).logits
        sharded_loss = trained(**probe).loss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for step in range(args.steps):
        start = (step * world + rank) * args.batch_size
        batch = {k: v.to(device) for k, v in collator(data[start : start + args.batch_size]).items()}
        loss = trained(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if rank == 0:
            log.info("step %d loss %.4f", step, loss.item())
    after = base_digest(model) if args.engine == "fsdp" else None
    dcp.save(get_model_state_dict(model), checkpoint_id=f"{args.out}/dcp")
    if rank == 0 and args.report:
        report = {
            "world_size": world,
            "fsdp_unit_classes": sorted({type(m).__name__ for m in units}) if args.engine == "fsdp" else [],
            "base_blocks_are_fsdp_units": args.engine == "fsdp" and all(
                type(layer).__name__.startswith("FSDP") for layer in model.language_model.model.layers
            ),
            "text_logits_equal_unsharded": torch.equal(sharded_text.cpu(), expected_text.cpu()),
            "multimodal_loss_sharded": sharded_loss.item(),
            "multimodal_loss_unsharded": expected_loss.item(),
            "losses": losses,
            "base_unchanged_by_training": before == after if args.engine == "fsdp" else None,
        }
        with open(args.report, "w") as handle:
            json.dump(report, handle, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
