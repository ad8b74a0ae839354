"""dia as a library: your own model, a gradient your own PyTorch code computed, every form an update arrives
in, several clients, labels, capture/check/evaluate, and bad input as one-line UserErrors."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dia
from dia.config import group_settings
from dia.data import load_victims
from dia.updates import as_gradients, capturable

MEAN, STD = 0.1307, 0.3081
FAST = dict(compile=False, max_iterations=300)


class Net(nn.Module):
    """A researcher's own model: nn.Dropout layers, no dia anywhere."""

    def __init__(self, p: float = 0.25, width: int = 128) -> None:
        super().__init__()
        self.fc1, self.drop1 = nn.Linear(784, width, bias=False), nn.Dropout(p)
        self.fc2, self.drop2 = nn.Linear(width, width, bias=False), nn.Dropout(p)
        self.out = nn.Linear(width, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(F.gelu(self.fc1(x.flatten(1))))
        return self.out(self.drop2(F.gelu(self.fc2(x))))


def victims(n: int = 1):
    v = load_victims(group_settings("data", "mnist"), indices=list(range(n)), count=n, seed=None)
    return v.images, v.labels


def own_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> dict:
    """What a client's own training code computes: train mode, dropout active, loss.backward()."""
    model.train()
    model.zero_grad()
    F.cross_entropy(model((x - MEAN) / STD), y, reduction=reduction).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net()
    x, y = victims(1)
    return model, x, y, own_gradient(model, x, y)


def test_reconstructs_your_own_model_from_your_own_gradient(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written unless a folder is asked for
    model, x, y, grads = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = dia.reconstruct(model, grads, labels=y, input_shape=(1, 28, 28), mean=(MEAN,), std=(STD,), attack="dia", **FAST)
    assert r.images.shape == (1, 1, 28, 28) and float(r.images.min()) >= 0 and float(r.images.max()) <= 1
    assert set(r.masks) == {"drop1", "drop2"} and r.masks["drop1"].shape == (1, 1, 128)  # your module names
    dia_ssim = dia.evaluate(r, x)["mean"]["ssim"]
    ig = dia.reconstruct(model, grads, labels=y, input_shape=(1, 28, 28), mean=(MEAN,), std=(STD,), attack="ig", **FAST)
    ig_ssim = dia.evaluate(ig, x)["mean"]["ssim"]
    assert dia_ssim > 0.8 and dia_ssim - ig_ssim > 0.3, (dia_ssim, ig_ssim)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # your model is untouched
    assert os.listdir(tmp_path) == []


def test_every_form_of_an_update_reads_as_the_same_gradient(setup, tmp_path):
    model, x, y, grads = setup
    twin = capturable(model, x[:1])
    ref = as_gradients(twin, grads)[0]
    arrays = [g.numpy() for g in grads.values()]  # Flower's parameters_to_ndarrays, parameters() order
    torch.save(grads, tmp_path / "g.pt")
    torch.save(list(grads.values()), tmp_path / "list.pt")
    np.savez(tmp_path / "named.npz", **{n: a for n, a in zip(grads, arrays)})
    np.savez(tmp_path / "ordered.npz", *arrays)
    lr = 0.05
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: lr * g for n, g in grads.items()}
    weights = [(w0[n] - lr * g).numpy() for n, g in grads.items()]
    forms = [
        (arrays, {}),
        (tmp_path / "g.pt", {}),
        (str(tmp_path / "list.pt"), {}),
        (tmp_path / "named.npz", {}),
        (tmp_path / "ordered.npz", {}),
        (delta, dict(kind="delta", lr=lr)),
        (weights, dict(kind="weights", lr=lr)),
    ]
    for form, kw in forms:
        got = as_gradients(twin, form, **kw)
        assert len(got) == 1 and list(got[0]) == list(ref)
        for n in ref:
            torch.testing.assert_close(got[0][n], ref[n], rtol=1e-5, atol=1e-6 if "kind" not in kw else 1e-4)
    assert len(as_gradients(twin, [grads, tmp_path / "g.pt", arrays])) == 3  # several clients


def test_several_clients_in_one_program_and_labels_inferred(tmp_path):
    torch.manual_seed(1)
    model = Net(p=0.0, width=64)
    x, y = victims(2)
    grads = [own_gradient(model, x[i : i + 1], y[i : i + 1]) for i in range(2)]
    r = dia.reconstruct(
        model, grads, input_shape=(1, 28, 28), mean=(MEAN,), std=(STD,), attack="ig", out=tmp_path / "run", **FAST
    )
    assert r.labels.flatten().tolist() == y.tolist()  # inferred from the gradients (batch size 1)
    assert r.images.shape == (2, 1, 28, 28) and len(r.status) == 2
    assert dia.evaluate(r, x)["mean"]["ssim"] > 0.9  # no dropout: IG recovers both
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "config.yaml",
        "metrics.json",
        "reconstructions.png",
        "reconstructions.pt",
    }
    with pytest.raises(dia.UserError, match="already exists"):
        dia.save(r, tmp_path / "run")


def test_capture_check_and_evaluate_round_trip():
    torch.manual_seed(2)
    model = Net(p=0.5, width=32)
    x, y = victims(2)
    xn = (x - MEAN) / STD
    update = dia.capture_update(model, xn, y, lr=0.1, seed=3)
    assert set(update.masks) == {"drop1", "drop2"} and update.masks["drop1"].shape == (2, 32)
    assert dia.check_update(model, update, xn, y, masks=update.masks).consistent
    # the usual culprits are named
    summed = {n: g * 2 for n, g in update.gradient.items()}
    assert "reduction" in dia.check_update(model, summed, xn, y, masks=update.masks).culprits[0]
    assert any("dropout" in c for c in dia.check_update(model, update, xn, y).culprits)
    raw = dia.capture_update(model, x, y, seed=3)  # a client that forgot to normalize
    check = dia.check_update(model, raw, xn, y, masks=raw.masks, mean=(MEAN,), std=(STD,))
    assert not check.consistent and "un-normalized" in check.culprits[0], str(check)
    eval_mode = model.eval()
    model.zero_grad()
    F.cross_entropy(eval_mode(xn), y).backward()
    sent = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert "eval mode" in dia.check_update(model, sent, xn, y, masks=update.masks).culprits[0]
    # WIIG with the recorded masks reconstructs almost exactly; evaluate reports mask recovery for DIA
    wiig = dia.reconstruct(
        model,
        update.delta(),
        kind="delta",
        lr=0.1,
        labels=y,
        masks=update.masks,
        input_shape=(1, 28, 28),
        mean=(MEAN,),
        std=(STD,),
        attack="wiig",
        **FAST,
    )
    assert dia.evaluate(wiig, x)["mean"]["ssim"] > 0.9
    r = dia.reconstruct(
        model,
        update,
        labels=y,
        input_shape=(1, 28, 28),
        mean=(MEAN,),
        std=(STD,),
        attack="dia",
        compile=False,
        max_iterations=20,
    )
    scores = dia.evaluate(r, x, masks=update.masks)
    assert scores["mean"]["mask_bal_acc"] is not None and len(scores["victims"]) == 2


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "missing \\['out.weight'\\]"),
        ("extra", "unknown name \\['head.weight'\\]"),
        ("shape", "'fc2.weight' has shape \\(4, 4\\)"),
        ("nan", "'fc1.weight' holds NaN or inf"),
        ("int", "'fc1.weight' has dtype torch.int64"),
        ("count", "2 arrays, but the model has 3 parameters"),
        ("labels", "label 12 out of range for a model with 10 classes"),
        ("no_dropout_masks", "masks: given, but the model has no dropout"),
        ("wiig_without_masks", "needs the client's dropout masks"),
        ("setting", "unknown key 'attack.mask_wieght'"),
        ("setting_value", "attack.max_iterations=0"),
        ("attack", "unknown attack 'dai'"),
        ("kind", "kind='grad'"),
        ("lr", "lr=0: kind=delta needs"),
        ("file", "no such file"),
        ("pickle", "cannot read"),
        ("shape_input", "input_shape=\\(28, 28\\)"),
        ("std", "std\\[0\\]=0.0: must be a finite number in \\[1e-06"),
    ],
)
def test_bad_input_is_one_line_naming_it(setup, tmp_path, case, match):
    model, x, y, grads = setup
    kw = dict(labels=y, input_shape=(1, 28, 28), mean=(MEAN,), std=(STD,), attack="ig", compile=False, max_iterations=1)
    update: object = dict(grads)
    if case == "missing":
        update.pop("out.weight")
    elif case == "extra":
        update["head.weight"] = torch.zeros(3)
    elif case == "shape":
        update["fc2.weight"] = torch.zeros(4, 4)
    elif case == "nan":
        update["fc1.weight"] = torch.full_like(grads["fc1.weight"], float("nan"))
    elif case == "int":
        update["fc1.weight"] = torch.zeros_like(grads["fc1.weight"], dtype=torch.long)
    elif case == "count":
        update = [g.numpy() for g in list(grads.values())[:2]]
    elif case == "labels":
        kw["labels"] = torch.tensor([12])
    elif case == "no_dropout_masks":
        model, update = Net(p=0.0), own_gradient(Net(p=0.0), x, y)
        kw["masks"] = {"drop1": torch.ones(1, 128)}
    elif case == "wiig_without_masks":
        kw["attack"] = "wiig"
    elif case == "setting":
        kw["attack"], kw["mask_wieght"] = "dia", 1.0
    elif case == "setting_value":
        kw["max_iterations"] = 0
    elif case == "attack":
        kw["attack"] = "dai"
    elif case == "kind":
        kw["kind"] = "grad"
    elif case == "lr":
        kw.update(kind="delta", lr=0)
    elif case == "file":
        update = tmp_path / "nope.pt"
    elif case == "pickle":
        torch.save({"w": object()}, tmp_path / "p.pt")
        update = tmp_path / "p.pt"
    elif case == "shape_input":
        kw["input_shape"] = (28, 28)
    elif case == "std":
        kw["std"] = (0.0,)
    with pytest.raises(dia.UserError, match=match) as err:
        dia.reconstruct(model, update, **kw)
    assert "\n" not in str(err.value)


class TupleNet(Net):
    def forward(self, x: torch.Tensor) -> tuple:
        return (super().forward(x),)


class DictNet(Net):
    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": super().forward(x)}


def _captured(model: nn.Module, n: int = 1, **kw) -> dia.ClientUpdate:
    x, y = victims(n)
    return dia.capture_update(model, (x - MEAN) / STD, y, seed=0, **kw)


def _other(u: dia.ClientUpdate, **changes) -> dia.ClientUpdate:
    import dataclasses

    return dataclasses.replace(u, **changes)


def _masks(u: dia.ClientUpdate, value: float) -> dict:
    masks = {k: v.clone() for k, v in u.masks.items()}
    masks["drop1"][0, 0] = value
    return masks


# issue 27 (and 25's update contents): case -> (a change of (model, update, keyword arguments), the expected line)
DOOR = {
    "meta-model": (lambda m, u, kw: (Net().to("meta"), u, kw), "model: 'fc1.weight' is on the meta device"),
    "nan-model": (
        lambda m, u, kw: (
            nn.Sequential(Net()).requires_grad_(False).apply(_nan_weights),
            {"0." + k: v for k, v in u.items()},
            kw,
        ),
        "model: '0.fc1.weight' holds NaN or inf",
    ),
    "tuple-model": (
        lambda m, u, kw: (TupleNet(), u, kw),
        "model: its forward returns a tuple; dia needs the logits, a tensor (batch, classes)",
    ),
    "dict-model": (lambda m, u, kw: (DictNet(), u, kw), "model: its forward returns a dict"),
    "masks-empty-list": (lambda m, u, kw: (m, u, kw | dict(attack="wiig", masks=[])), "masks: a list of 0"),
    "masks-nan": (
        lambda m, u, kw: (m, _captured(m), kw | dict(attack="wiig", masks=_masks(_captured(m), float("nan")))),
        "masks: 'drop1' holds NaN or inf",
    ),
    "masks-7": (
        lambda m, u, kw: (m, _captured(m), kw | dict(attack="wiig", masks=_masks(_captured(m), 7.0))),
        "masks: 'drop1' holds 7.0; a recorded keep-mask holds 0 (dropped) and 1 (kept) only",
    ),
    "input-shape-too-large": (
        lambda m, u, kw: (m, u, kw | dict(input_shape=(1, 10**6, 10**6))),  # 29,800 GiB: more than any machine
        "input_shape=(1, 1000000, 1000000): 1 image(s) of (1, 1000000, 1000000) need about 29802.3 GiB in the attack",
    ),
    "input-shape-float": (lambda m, u, kw: (m, u, kw | dict(input_shape=(1, 28.0, 28))), "three positive integers"),
    "input-shape-vs-images": (
        lambda m, u, kw: (m, _captured(m), kw | dict(input_shape=(1, 14, 56), labels=None)),
        "input_shape=(1, 14, 56): update carries images of shape (1, 28, 28)",
    ),
    "client-lr-nan": (lambda m, u, kw: (m, u, kw | dict(lr=float("nan"))), "lr=nan: must be a finite number > 0"),
    "client-lr-unused": (
        lambda m, u, kw: (m, u, kw | dict(lr=0.01)),
        "lr=0.01: the client's learning rate, used with kind='delta'/'weights' or local_steps > 1 only; the "
        "attack's step size is attack_lr=0.01",
    ),
    "attack-lr-nan": (lambda m, u, kw: (m, u, kw | dict(attack_lr=float("nan"))), "attack.lr=nan: must be > 0"),
    "labels-2d-transposed": (
        lambda m, u, kw: (m, [u, u], kw | dict(labels=torch.tensor([[7, 7]]))),
        "labels: shape (1, 2) for 2 client(s); give (K, B) = (2, B)",
    ),
    "labels-3d": (lambda m, u, kw: (m, u, kw | dict(labels=torch.zeros(1, 1, 1, dtype=torch.long))), "labels: shape"),
    "labels-vs-update": (
        lambda m, u, kw: (m, _captured(m, 2), kw | dict(labels=torch.tensor([1, 7]))),
        "labels: [1, 7] for update, which carries its labels [7, 1]; leave labels out",
    ),
    "std-subnormal": (lambda m, u, kw: (m, u, kw | dict(std=(1e-40,))), "std[0]=1e-40: must be a finite number"),
    "std-huge": (lambda m, u, kw: (m, u, kw | dict(std=(1e30,))), "std[0]=1e+30: must be a finite number"),
    "mean-nan-tensor": (
        lambda m, u, kw: (m, u, kw | dict(mean=torch.tensor([float("nan")]))),
        "mean[0]=nan: must be a finite number",
    ),
    "two-models": (
        lambda m, u, kw: (m, [_captured(m), _captured(Net())], kw | dict(labels=None)),
        "update 1: an update from another model",
    ),
    "zero-update": (
        lambda m, u, kw: (m, {k: torch.zeros_like(v) for k, v in u.items()}, kw),
        "update: every value is 0",
    ),
    "sparse-update": (
        lambda m, u, kw: (m, u | {"fc1.weight": u["fc1.weight"].to_sparse()}, kw),
        "update: 'fc1.weight' is a sparse_coo tensor",
    ),
    "meta-update": (
        lambda m, u, kw: (m, u | {"fc1.weight": u["fc1.weight"].to("meta")}, kw),
        "update: 'fc1.weight' is on the meta device",
    ),
    "complex-update": (
        lambda m, u, kw: (m, u | {"fc1.weight": u["fc1.weight"].to(torch.complex64)}, kw),
        "update: 'fc1.weight' has dtype torch.complex64",
    ),
    "non-string-key": (lambda m, u, kw: (m, {**u, 3: u["out.weight"]}, kw), "update: has the key 3 (int)"),
    **{
        f"ClientUpdate-lr-{lr}": (
            lambda m, u, kw, lr=lr: (m, _other(_captured(m), lr=lr), kw | dict(labels=None)),
            f"update: lr={lr}: must be a finite number > 0",
        )
        for lr in (0, -1, float("nan"))
    },
    "ClientUpdate-lr-vector": (
        lambda m, u, kw: (m, _other(_captured(m), lr=torch.tensor([0.1, 0.2])), kw | dict(labels=None)),
        "update: lr holds 2 values (2,); give one number",
    ),
    "ClientUpdate-nan-images": (
        lambda m, u, kw: (m, _other(_captured(m), images=torch.full((1, 1, 28, 28), float("nan"))), kw),
        "update: 'images' holds NaN or inf",
    ),
    "ClientUpdate-kind": (
        lambda m, u, kw: (m, _captured(m), kw | dict(kind="delta", lr=0.1)),
        "kind='delta': update is a ClientUpdate, which holds a gradient",
    ),
    "ClientUpdate-steps-contradicted": (
        lambda m, u, kw: (m, _captured(m, lr=0.1, local_steps=2), kw | dict(local_steps=3, labels=None)),
        "local_steps=3: update says 2",
    ),
    "ClientUpdate-lr-contradicted": (
        lambda m, u, kw: (m, _captured(m, lr=0.1, local_steps=2), kw | dict(lr=0.2, labels=None)),
        "lr=0.2: update says lr=0.1",
    ),
    "ClientUpdate-beside-bare": (
        lambda m, u, kw: (m, [_captured(m), u], kw | dict(labels=None)),
        "update 1: a bare update beside ClientUpdates",
    ),
    "unrolled-steps-memory": (
        lambda m, u, kw: (m, u, kw | dict(local_steps=10**6, lr=0.1)),
        "local_steps=1000000: unrolling 1000000 local steps needs about",
    ),
}


def _nan_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.weight.fill_(float("nan"))


@pytest.mark.parametrize("case", list(DOOR))
def test_every_argument_is_checked_at_the_door_in_one_line(setup, case):
    """Issue 27: each was a raw exception (meta model, a tuple or dict forward, masks=[], a 40 GB allocation) or a
    silently returned result (lr=nan, labels of another shape, a float input_shape, std out of bounds, masks of
    NaN or 7.0, updates of two models, ...); now one UserError line naming the argument, before any work."""
    model, x, y, grads = setup
    kw = dict(labels=y, input_shape=(1, 28, 28), mean=(MEAN,), std=(STD,), attack="ig", compile=False, max_iterations=1)
    change, match = DOOR[case]
    model, update, kw = change(model, dict(grads), kw)
    with pytest.raises(dia.UserError, match=re.escape(match)) as err:
        dia.reconstruct(model, update, **kw)
    assert "\n" not in str(err.value)


def test_what_a_client_update_carries_is_used(setup, tmp_path):
    """Issue 25: a ClientUpdate of 2 images attacked without labels= (the object, or its saved client.pt) gave ONE
    image labelled [[1]], silently; docs/api.md's FedAvg snippet failed on the masks. Its labels, batch size, T and
    lr are used now; its images' shape is the default input_shape."""
    model = setup[0]
    x, y = victims(2)
    u = dia.capture_update(model, (x - MEAN) / STD, y, lr=0.1, seed=0)
    for sent in (u, u.save(tmp_path / "client.pt")):
        r = dia.reconstruct(model, sent, mean=(MEAN,), std=(STD,), attack="ig", compile=False, max_iterations=2)
        assert r.images.shape == (2, 1, 28, 28) and r.labels.tolist() == [y.tolist()]
    # docs/api.md's FedAvg snippet, as written, with 2 images
    u3 = dia.capture_update(model, (x - MEAN) / STD, y, lr=0.1, local_steps=3)
    r = dia.reconstruct(model, u3, input_shape=(1, 28, 28), attack="wiig", masks=u3, compile=False, max_iterations=2)
    assert r.problems.local.steps == 3 and r.problems.local.lr == 0.1 and r.labels.tolist() == [y.tolist()]
    again = dia.reconstruct(  # arguments that repeat what it carries are fine
        model, u3, labels=y, lr=0.1, local_steps=3, attack="wiig", masks=u3, compile=False, max_iterations=2
    )
    assert torch.equal(again.images, r.images)


def test_mean_std_as_tensors_and_a_model_without_dropout(setup):
    """mean/std given as tensors are accepted (as sequences are); DIA on a model without any dropout site warns that
    it is IG there (design.md: a model without dropout gives DIA no masks) and returns IG's reconstruction."""
    _, x, y, _ = setup
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.GELU(), nn.Linear(32, 10))
    grads = own_gradient(plain, x, y)
    kw = dict(labels=y, input_shape=(1, 28, 28), compile=False, max_iterations=5)
    with pytest.warns(UserWarning, match="the model has no dropout .* it behaves as IG"):
        r = dia.reconstruct(plain, grads, mean=torch.tensor([MEAN]), std=torch.tensor([STD]), attack="dia", **kw)
    ig = dia.reconstruct(plain, grads, mean=(MEAN,), std=(STD,), attack="ig", **kw)
    assert r.masks is None and torch.equal(r.images, ig.images)


def test_evaluate_and_save_refuse_bad_originals_and_write_nothing(setup, tmp_path):
    """Issue 27: save with originals of the wrong shape writes nothing (no .lock, no .partial) and a save with the
    right ones then works; issue 25: NaN originals or masks were accepted for evaluation."""
    model, x, y, grads = setup
    r = dia.reconstruct(model, grads, labels=y, input_shape=(1, 28, 28), attack="ig", compile=False, max_iterations=1)
    u = _captured(model)
    for bad, masks, match in (
        (torch.rand(2, 1, 28, 28), None, "originals: shape \\(2, 1, 28, 28\\)"),
        (torch.full_like(x, float("nan")), None, "originals holds NaN or inf"),
        ((x - MEAN) / STD, None, "originals: values in \\[-0.424, 2.8.\\]; give the images in \\[0, 1\\]"),
        (x, _masks(u, float("nan")), "masks: 'drop1' holds NaN or inf"),
    ):
        with pytest.raises(dia.UserError, match=match):
            dia.evaluate(r, bad, masks=masks)
        with pytest.raises(dia.UserError, match=match):
            dia.save(r, tmp_path / "run", originals=bad, masks=masks)
        assert os.listdir(tmp_path) == []  # no .run.lock, no .run.partial
    assert dia.save(r, tmp_path / "run", originals=x) == tmp_path / "run"
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_import_dia_loads_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys, dia; heavy = [m for m in ('torch', 'lightning', 'wandb', 'timm', 'torchmetrics') if m in "
        "sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = (
        "import sys; from dia.config import help_text; help_text([]); "
        "print([m for m in ('torch', 'lightning', 'wandb', 'timm') if m in sys.modules])"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


CLI = [
    "model=mlp",
    "model.width=64",
    "model.dropout=0.25",
    "attack.max_iterations=150",
    "attack.compile=false",
    "logger.wandb.mode=disabled",
    "metrics.lpips=off",
    "run.progress=false",
    "metrics.curves_ssim=false",
]


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A client's update captured with the API for a zoo model, the model's checkpoint, and a bare gradient file."""
    root = tmp_path_factory.mktemp("captured")
    sim = dia.simulate(*CLI, "victims=[1]")
    torch.save(sim.model.state_dict(), root / "ckpt.pt")
    update = dia.capture_update(sim.model, (sim.victims.images - sim.mean) / sim.std, sim.victims.labels, seed=3)
    update.save(root / "client.pt")
    np.savez(root / "bare.npz", *[g.numpy() for g in update.gradient.values()])  # Flower's list of arrays
    return root, sim, update


def test_the_command_line_attacks_a_captured_update_file(captured):
    """`dia.train captured.file=...` with the zoo model's checkpoint: the same reconstruction as the API on the same
    update, evaluated against the images the file carries; a bare file with inferred labels gives the same images."""
    from dia.train import main

    root, sim, update = captured
    args = [*CLI, f"model.checkpoint={root / 'ckpt.pt'}", f"run.output_dir={root / 'runs'}"]
    assert main([*args, f"captured.file={root / 'client.pt'}", "run.name=full"]) == 0
    m = json.loads((root / "runs" / "full" / "metrics.json").read_text())
    assert m["victims"][0]["ssim"] > 0.8 and m["victims"][0]["mask_bal_acc"] > 0.8 and m["label_accuracy"] == 1.0
    api = dia.reconstruct(
        sim.model,
        update,
        labels=update.labels,
        input_shape=(1, 28, 28),
        mean=(MEAN,),
        std=(STD,),
        attack="dia",
        compile=False,
        max_iterations=150,
        seed=0,
    )
    saved = torch.load(root / "runs" / "full" / "reconstructions.pt", weights_only=True)
    assert torch.allclose(saved["reconstructions"], api.images, atol=1e-5)  # one attack, two doors
    assert main([*args, f"captured.file={root / 'bare.npz'}", "attack.labels=infer", "run.name=bare"]) == 0
    bare = json.loads((root / "runs" / "bare" / "metrics.json").read_text())
    assert bare["victims"][0]["ssim"] is None and bare["label_accuracy"] is None  # no images to compare with
    assert bare["victims"][0]["attack_label"] == int(update.labels[0])
    rec = torch.load(root / "runs" / "bare" / "reconstructions.pt", weights_only=True)["reconstructions"]
    assert torch.allclose(rec, saved["reconstructions"], atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["captured.file=bare.npz"], "captured.file 'bare.npz': holds no labels; set attack.labels=infer"),
        (
            ["captured.file=bare.npz", "attack=wiig", "attack.labels=infer"],
            "attack=wiig: needs the client's dropout masks",
        ),
        (["captured.file=missing.pt"], "captured.file='missing.pt': no such file"),
        (
            ["captured.file=bare.npz", "captured.kind=delta", "attack.labels=infer"],
            "captured.lr: captured.kind=delta needs",
        ),
        (["captured.file=client.pt", "defense=prune"], "defense=prune: defenses apply to simulated clients"),
        (["captured.file=client.pt", "model.width=32"], "an update from another model"),
    ],
)
def test_a_bad_captured_update_is_one_line_and_writes_nothing(captured, extra, message, monkeypatch, capsys):
    from dia.train import main

    root, _, _ = captured
    monkeypatch.chdir(root)
    args = [
        *CLI,
        "model.checkpoint=ckpt.pt" if "model.width=32" not in extra else "model.checkpoint=",
        "run.output_dir=bad",
    ]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (root / "bad").exists() or not any(p for p in (root / "bad").iterdir() if p.name != ".compile-cache")


def test_a_captured_multi_step_update_is_attacked_as_such(captured):
    """A ClientUpdate of T = 3 local steps carries its T, learning rate and masks: WIIG replays the three mask
    sets through the unrolled steps and reconstructs; metrics.json records the client's training."""
    from dia.train import main

    root, sim, _ = captured
    update = dia.capture_update(
        sim.model, (sim.victims.images - sim.mean) / sim.std, sim.victims.labels, seed=1, local_steps=3, lr=0.1
    )
    update.save(root / "client3.pt")
    args = [*CLI, f"model.checkpoint={root / 'ckpt.pt'}", f"run.output_dir={root / 'runs'}", "attack=wiig"]
    assert main([*args, f"captured.file={root / 'client3.pt'}", "run.name=t3"]) == 0
    m = json.loads((root / "runs" / "t3" / "metrics.json").read_text())
    assert m["client"]["local_steps"] == 3 and m["victims"][0]["ssim"] > 0.85


def test_check_update_refuses_a_multi_step_update_in_one_line(setup):
    model, x, y, _ = setup
    update = dia.capture_update(model, (x - MEAN) / STD, y, seed=0, local_steps=2, lr=0.1)
    with pytest.raises(dia.UserError, match="local steps; check_update recomputes one full-batch step"):
        dia.check_update(model, update, (x - MEAN) / STD, y, masks=update.masks)
