"""Train the FID-digits feature network: a small CNN classifier of scikit-learn's digits (16×16).

    python examples/train_digits_features.py --out runs/digits_features.safetensors

(the shipped network was written with ``--out diffsolve/models/digits_features.safetensors --force``: an
existing ``--out`` is replaced only with ``--force``).

Seeded; about half a minute on one CPU core. The network (:class:`diffsolve.fid.features.DigitsCNN`) is
trained on the training split of :func:`diffsolve.data.digits` only — the 300 held-out digits stay unseen, so
"held-out vs training digits" is a fair FID-digits baseline — with random ±1-pixel shifts and light noise so
that its features also respond smoothly to imperfect samples. Images go through the same 8-bit rounding as
PNG files and generated samples do before features are taken. Its 64-d penultimate layer gives the features;
the held-out accuracy is printed and stored in the file's metadata.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import save

from diffsolve.data import digits
from diffsolve.cliargs import HelpFormatter, add_force_arg, finite_float, output_file, positive_int, refuse_to_overwrite
from diffsolve.files import atomic_write
from diffsolve.fid.features import DigitsCNN, to_uint8


def quantise(x: torch.Tensor) -> torch.Tensor:
    return to_uint8(x).float() / 127.5 - 1.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (replicate padding: the background is −1) and N(0, 0.05²) noise."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2, b), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(b)])
    return (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=output_file(".safetensors"), default="runs/digits_features.safetensors",
                        help="the weights file to write")
    add_force_arg(parser)
    parser.add_argument("--epochs", type=positive_int, default=40, help="passes over the training digits")
    parser.add_argument("--batch", type=positive_int, default=64, help="images per step")
    parser.add_argument("--lr", type=finite_float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and augmentation")
    args = parser.parse_args()
    refuse_to_overwrite(parser, args.out, args.force)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    x_train, x_test = quantise(x_train), quantise(x_test)

    net = DigitsCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(x_train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            loss = F.cross_entropy(net(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            net.eval()
            with torch.no_grad():
                acc = (net(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1}: train loss {total / len(x_train):.4f}, held-out accuracy {acc:.4f}")

    net.eval()
    with torch.no_grad():
        acc = (net(x_test).argmax(1) == y_test).float().mean().item()
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {"arch": DigitsCNN.ARCH, "feature_dim": str(DigitsCNN.FEATURE_DIM), "held_out_accuracy": f"{acc:.4f}",
                "seed": str(args.seed), "epochs": str(args.epochs)}
    out = atomic_write(args.out, lambda f: f.write(save(state, metadata=metadata)))
    print(f"held-out accuracy {acc:.4f}; wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
