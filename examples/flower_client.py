"""A Flower client's update, attacked on the server side.

The client is a Flower `NumPyClient`: `fit` loads the global weights, trains its own model (dropout active) on
its private image with plain SGD for the round's `local_steps` (FedAvg: fresh dropout masks at every step) and
returns its new weights. The server sees exactly what Flower delivers (a `FitRes` whose parameters it
deserializes with `parameters_to_ndarrays`) and the global model, never the image, the label or the client's
dropout masks. `dia.reconstruct(kind="weights", lr=..., local_steps=...)` attacks it, unrolling the local steps
(the server set the learning rate and the number of steps: they are in the round's config).

    pip install -e ".[flower]"                                # in the checkout: dia-leakage with Flower
    python examples/flower_client.py                          # 2 clients, 3 local steps, 1,500 iterations
    python examples/flower_client.py --iterations 300 --min-ssim 0.8   # what CI runs
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dia

try:
    from flwr.client import NumPyClient
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
except ModuleNotFoundError as exc:  # one line, not a traceback
    if exc.name is None or exc.name.split(".")[0] != "flwr":
        raise
    sys.exit('error: this example needs Flower: pip install -e ".[flower]" in the dia checkout (or pip install flwr)')

MEAN, STD = 0.1307, 0.3081


class Net(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(p)
        )
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Client(NumPyClient):
    """A federated client as Flower's tutorials write it: weights travel as the state_dict's arrays."""

    def __init__(self, model: nn.Module, image: torch.Tensor, label: torch.Tensor) -> None:
        self.model, self.x, self.y = model, (image - MEAN) / STD, label

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return [v.detach().cpu().numpy() for v in self.model.state_dict().values()]

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        keys = self.model.state_dict().keys()
        self.model.load_state_dict(OrderedDict((k, torch.from_numpy(v)) for k, v in zip(keys, parameters)))
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config["lr"]))
        self.model.train()
        for _ in range(int(config["local_steps"])):
            opt.zero_grad()
            F.cross_entropy(self.model(self.x), self.y).backward()
            opt.step()
        return self.get_parameters({}), len(self.y), {}


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--iterations", type=int, default=1500)
    a.add_argument("--clients", type=int, default=2)
    a.add_argument("--dropout", type=float, default=0.25)
    a.add_argument(
        "--lr", type=float, default=0.05, help="the clients' SGD learning rate (the server knows it: it sent it)"
    )
    a.add_argument("--local-steps", type=int, default=3, help="local SGD steps per round (the server sent it too)")
    a.add_argument("--min-ssim", type=float, default=0.9, help="fail (exit 1) if DIA's mean SSIM is below this")
    args = a.parse_args()

    torch.manual_seed(0)
    with resources.as_file(resources.files("dia.assets") / "mnist_128.npz") as f, np.load(f) as npz:
        images = torch.from_numpy(npz["images"][: args.clients]).permute(0, 3, 1, 2).float() / 255
        labels = torch.from_numpy(npz["labels"][: args.clients]).long()
    server_model = Net(args.dropout)  # the global model: the server holds its weights
    round_config = {"lr": args.lr, "local_steps": args.local_steps}
    ins = FitIns(ndarrays_to_parameters([v.numpy() for v in server_model.state_dict().values()]), round_config)

    received = []
    for i in range(args.clients):  # each client trains its own copy of the global model on its private image
        client = Client(Net(args.dropout), images[i : i + 1], labels[i : i + 1]).to_client()
        res = client.fit(ins)  # what travels back to the server
        received.append(parameters_to_ndarrays(res.parameters))

    r = dia.reconstruct(
        server_model,
        received,
        kind="weights",
        lr=args.lr,
        local_steps=args.local_steps,
        input_shape=(1, 28, 28),
        mean=(MEAN,),
        std=(STD,),
        attack="dia",
        max_iterations=args.iterations,
    )  # labels inferred from the update
    m = dia.evaluate(r, images)
    print(
        f"DIA on {args.clients} Flower clients ({args.local_steps} local steps each): labels "
        f"{r.labels.flatten().tolist()} (true {labels.tolist()}), "
        f"SSIM {m['mean']['ssim']:.3f}, PSNR {m['mean']['psnr']:.1f} dB"
    )
    if m["mean"]["ssim"] < args.min_ssim or r.labels.flatten().tolist() != labels.tolist():
        print(f"FAILED: SSIM {m['mean']['ssim']:.3f} (needs >= {args.min_ssim}) or wrong labels", file=sys.stderr)
        return 1
    print("ok: the server recovered the clients' images from their Flower updates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
