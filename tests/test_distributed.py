"""The contrastive loss across 2 real gloo ranks equals the full-batch loss, gradients included."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipmoe.loss import clip_loss

WORLD, B, D = 2, 4, 8


def _full_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g)


def _rank_main(rank: int, port: int, local_loss: bool, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        img, txt = _full_batch()
        img = img[rank * B:(rank + 1) * B].clone().requires_grad_()
        txt = txt[rank * B:(rank + 1) * B].clone().requires_grad_()
        loss = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0),
                         local_loss=local_loss, gather_with_grad=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_equals_full_batch(tmp_path):
    img, txt = _full_batch()
    img.requires_grad_()
    txt.requires_grad_()
    full = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0))
    full.backward()
    mp.start_processes(_rank_main, args=(_free_port(), True, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # DDP averages over ranks: the rank-mean loss and rank-mean gradients are the full-batch ones
    assert torch.allclose(sum(r["loss"] for r in ranks) / WORLD, full, atol=1e-6)
    for r in range(WORLD):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(ranks[r]["img_grad"] / WORLD, img.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ranks[r]["txt_grad"] / WORLD, txt.grad[rows], atol=1e-6, rtol=1e-5)
