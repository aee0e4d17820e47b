"""Launched by tests/test_ddp.py under torchrun: trains the tiny ViT with ToE for one epoch in DDP and
saves this rank's final weights and the images it saw to OUT/rank{R}.pth."""
import sys

import torch

from tokenthrift.train import TrainConfig, Trainer

out = sys.argv[1]
cfg = TrainConfig(model="vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3,
                  num_heads=2, data="fashion-mnist", train_subset=256, eval_subset=100, batch_size=32, epochs=1,
                  warmup_epochs=0, method="toe", toe_milestones=(0, 1, 2), ema=True, progress=False, threads=1,
                  lr_base=1e-3,
                  output=out, name="ddp")
trainer = Trainer(cfg)
seen = []
trainer.train_loader.sampler.set_epoch(0)
seen = list(iter(trainer.train_loader.sampler))
summary = trainer.fit()
torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict(), "seen": seen,
            "world": trainer.dist.world_size, "lr": trainer.lr, "top1": summary["top1"],
            "ddp": type(trainer.net).__name__},
           f"{out}/rank{trainer.dist.rank}.pth")
