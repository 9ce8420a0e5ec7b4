"""Stage-2 training on torch's own distributed engines, DDP or FSDP2, in one script (gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node 2 examples/train_distributed.py --engine fsdp --out out/fsdp
    torchrun --nproc_per_node 2 examples/train_distributed.py --engine ddp --out out/ddp
    genieblue convert out/fsdp/dcp out/fsdp-hub --config out/fsdp/start --base out/fsdp/start-base

FSDP2 (``fully_shard``): the replicated blocks and the vision tower's layers are sharded one by one; the frozen base
is sharded as part of the root unit (the multimodal path reads it through a view that per-block FSDP hooks would not
reach). DDP: ``DistributedDataParallel`` over the model. Either way the state is saved with
``torch.distributed.checkpoint`` (the format these engines' users have), which ``genieblue convert`` reads. For the
Hugging Face Trainer (DDP), see ``train_stage2.py``.
"""

import argparse
import logging
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from genieblue_hf.synthetic import compose_tiny, shapes_dataset
from genieblue_hf.training import ConversationCollator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("train_distributed")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    model, processor = compose_tiny(seed=0)  # the same start on every rank
    if rank == 0:
        model.save_pretrained(f"{args.out}/start")
        processor.save_pretrained(f"{args.out}/start")
        model.language_model.save_pretrained(f"{args.out}/start-base")
    model.configure_training(stage=2)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model.to(device)
    if args.engine == "fsdp":
        for layer in model.replicated_layers.values():
            fully_shard(layer)
        vision = getattr(model.vision_tower, "vision_model", model.vision_tower)
        for layer in vision.encoder.layers:
            fully_shard(layer)
        fully_shard(model)
        trained = model
    else:
        trained = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    collator = ConversationCollator(processor)
    data = shapes_dataset(args.steps * args.batch_size * world, seed=3)
    model.train()
    for step in range(args.steps):
        start = (step * world + rank) * args.batch_size
        batch = {k: v.to(device) for k, v in collator(data[start : start + args.batch_size]).items()}
        loss = trained(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            log.info("step %d loss %.4f", step, loss.item())
    dcp.save(get_model_state_dict(model), checkpoint_id=f"{args.out}/dcp")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
