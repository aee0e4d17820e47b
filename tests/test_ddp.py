"""Two CPU processes under torchrun (gloo): both ranks must end with identical weights."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["ddp"] == "DistributedDataParallel"
    assert r0["lr"] == r1["lr"] == pytest.approx(1e-3 * 2 * 32 / 512)  # lr_base scaled by the global batch
    assert not set(r0["seen"]) & set(r1["seen"])  # each rank trained on its own half of the data
    assert len(r0["seen"]) + len(r1["seen"]) == 256
    for part in ("model", "ema"):
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), (part, key)
    assert r0["top1"] == r1["top1"]  # evaluation is sharded and summed over both ranks
    torch.manual_seed(0)  # the trainer's seed: the same initial weights as both ranks started from
    init = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                             embed_dim=32, depth=3, num_heads=2, num_classes=10).state_dict()
    assert not torch.equal(init["head.weight"], r0["model"]["head.weight"])  # it did train
    assert (tmp_path / "ddp" / "last.pth").exists() and (tmp_path / "ddp" / "metrics.jsonl").exists()
