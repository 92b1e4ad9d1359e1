"""The peer a platform must beat: the fine-tuning loop a team would write alone, in a notebook.

The same ImageNet EfficientNet-Lite0 weights as ``model.pretrained: imagenet``, the same 192 px and 3
epochs as the default registry; nothing else: resize to a square, horizontal flip, AdamW at 1e-3 with a
one-cycle schedule, binary cross-entropy, batch 32, the last epoch's weights (no checkpoint chosen on val).
Test AP is on the task's ``test`` split (``positive/`` vs ``normal/``).

    python benchmarks/plain_finetune.py work_dirs/quality_suite/blur [--seed 0] [--epochs 3] [--size 192]
        [--no-head-conv]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, Dataset

from waterdrop.evaluation.metrics import average_precision
from waterdrop.model.pretrained import load_packaged


class Folder(Dataset):
    def __init__(self, root: Path, size: int, train: bool):
        self.items = [(p, 1.0) for p in sorted((root / "positive").glob("*.jpg"))]
        self.items += [(p, 0.0) for p in sorted((root / "normal").glob("*.jpg"))]
        self.size, self.train = size, train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.train and random.random() < 0.5:
            image = image[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0  # mean=std=0.5
        return tensor, torch.tensor(label)


def lite0(seed: int, head_conv: bool = True) -> torch.nn.Module:
    """timm's whole classifier; without ``head_conv`` the classifier reads the last block's 320 channels
    instead of the pretrained 1x1 head convolution's 1280 (what timm's ``features_only`` gives)."""
    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    model.load_state_dict(load_packaged("tf_efficientnet_lite0", model.state_dict()))
    model.reset_classifier(1)
    if not head_conv:
        channels = model.conv_head.in_channels
        model.conv_head, model.bn2 = torch.nn.Identity(), torch.nn.Identity()
        model.classifier = torch.nn.Linear(channels, 1)
        torch.manual_seed(seed)
    return model


@torch.no_grad()
def scores(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    out, truth = [], []
    for images, labels in loader:
        out.append(model(images).squeeze(1).float().numpy())
        truth.append(labels.numpy())
    return np.concatenate(out), np.concatenate(truth)


def run(task: Path, seed: int = 0, epochs: int = 3, size: int = 192, lr: float = 1e-3, head_conv: bool = True) -> dict:
    began = time.time()
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(Folder(task / "train", size, True), batch_size=32, shuffle=True, num_workers=2,
                       generator=generator, drop_last=True)
    model = lite0(seed, head_conv)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(train))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loop_start = time.time()
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            loss = loss_fn(model(images).squeeze(1), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    train_s = time.time() - loop_start
    test = DataLoader(Folder(task / "test", size, False), batch_size=64, num_workers=2)
    test_scores, test_truth = scores(model, test)
    return {"test_ap": average_precision(test_scores, test_truth), "train_seconds": round(train_s, 1),
            "total_seconds": round(time.time() - began, 1), "seed": seed, "epochs": epochs, "input_size": size,
            "lr": lr, "head_conv": head_conv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", type=Path, help="a task folder with train/ and test/, each positive/ + normal/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--no-head-conv", action="store_true", help="drop the pretrained head convolution")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(json.dumps(run(args.task, args.seed, args.epochs, args.size, head_conv=not args.no_head_conv), indent=1))


if __name__ == "__main__":
    main()
