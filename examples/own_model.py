"""Attack your own model: a plain PyTorch MLP with nn.Dropout, a gradient computed by your own training code.

A client trains one step on a private image with dropout active and sends its gradient (a list of arrays in
`model.parameters()` order, as a federated stack ships it). The server knows the model and the gradient, not
the image nor the client's dropout masks. IG (mask-agnostic) fails; DIA recovers the image.

    python examples/own_model.py                      # 2 victims, 1,500 iterations (a few minutes on a laptop CPU)
    python examples/own_model.py --iterations 400 --min-ssim 0.75   # what CI runs
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dia

MEAN, STD = 0.1307, 0.3081  # MNIST's normalization, as your data pipeline applies it


class Net(nn.Module):
    """Your model: nothing of dia in it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc1, self.drop1 = nn.Linear(784, 256, bias=False), nn.Dropout(p)
        self.fc2, self.drop2 = nn.Linear(256, 256, bias=False), nn.Dropout(p)
        self.head = nn.Linear(256, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(F.gelu(self.fc1(x.flatten(1))))
        return self.head(self.drop2(F.gelu(self.fc2(x))))


def client_step(model: nn.Module, image: torch.Tensor, label: torch.Tensor) -> list[np.ndarray]:
    """Your client's training code: train mode (dropout active), mean cross-entropy, the gradient it sends."""
    model.train()
    loss = F.cross_entropy(model((image - MEAN) / STD), label)
    return [g.numpy() for g in torch.autograd.grad(loss, list(model.parameters()))]


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--iterations", type=int, default=1500)
    a.add_argument("--victims", type=int, default=2)
    a.add_argument("--dropout", type=float, default=0.25)
    a.add_argument("--min-ssim", type=float, default=0.9, help="fail (exit 1) if DIA's mean SSIM is below this")
    a.add_argument(
        "--out", type=Path, default=None, help="write DIA's run folder (reconstructions.png, metrics.json) here"
    )
    args = a.parse_args()

    torch.manual_seed(0)
    with (
        resources.as_file(resources.files("dia.assets") / "mnist_128.npz") as f,
        np.load(f) as npz,
    ):  # 128 MNIST test images
        images = torch.from_numpy(npz["images"][: args.victims]).permute(0, 3, 1, 2).float() / 255
        labels = torch.from_numpy(npz["labels"][: args.victims]).long()
    model = Net(args.dropout)
    sent = [client_step(model, images[i : i + 1], labels[i : i + 1]) for i in range(args.victims)]  # one client each

    scores = {}
    for attack in ("ig", "dia"):
        r = dia.reconstruct(
            model,
            sent,
            labels=labels.view(-1, 1),
            input_shape=(1, 28, 28),
            mean=(MEAN,),
            std=(STD,),
            attack=attack,
            max_iterations=args.iterations,
        )
        m = dia.evaluate(r, images)
        scores[attack] = m["mean"]["ssim"]
        print(
            f"{attack.upper():>4}: SSIM {m['mean']['ssim']:.3f}  PSNR {m['mean']['psnr']:.1f} dB  "
            f"({', '.join(f'{s} after {int(i)} its' for s, i in zip(r.status, r.iterations))})"
        )
        if attack == "dia" and args.out is not None:
            print(f"wrote {dia.save(r, args.out, originals=images)}")
    if scores["dia"] < args.min_ssim or scores["dia"] - scores["ig"] < 0.3:
        print(
            f"FAILED: DIA SSIM {scores['dia']:.3f} (needs >= {args.min_ssim}, and 0.3 above IG's {scores['ig']:.3f})",
            file=sys.stderr,
        )
        return 1
    print(f"ok: dropout did not protect the images (DIA {scores['dia']:.3f} vs IG {scores['ig']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
