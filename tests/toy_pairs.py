"""A small, learnable paired image-report set for trainer tests (follows the trainer's item contract).

Each class is a label set with a visual signature (a coloured square at a class-specific place on a
dark disc, like a lesion on a fundus) and a few report phrasings in English and Chinese. Images get
noise and a random shift, so the model must learn the signature, not memorise pixels.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

NUM_LABELS = 19
# (label indices, colour RGB in [0, 1], top-left corner of the square, report phrasings)
CLASSES = [
    ((0,), (0.9, 0.2, 0.2), (4, 4), ["normal fundus", "正常眼底", "no abnormality seen"]),
    (
        (1,),
        (0.2, 0.9, 0.2),
        (4, 18),
        ["diabetic retinopathy with haemorrhages", "糖尿病视网膜病变", "DR, dot blots"],
    ),
    ((3,), (0.2, 0.2, 0.9), (18, 4), ["glaucomatous optic disc cupping", "青光眼视盘凹陷", "glaucoma"]),
    ((1, 10), (0.9, 0.9, 0.2), (18, 18), ["DR with macular oedema", "糖尿病视网膜病变伴黄斑水肿", "DME"]),
    ((5,), (0.9, 0.2, 0.9), (11, 11), ["pathological myopia", "病理性近视", "myopic maculopathy"]),
    ((7,), (0.2, 0.9, 0.9), (11, 2), ["retinal vein occlusion", "视网膜静脉阻塞", "BRVO"]),
]


class ToyPairs(Dataset):
    def __init__(self, n: int, image_size: int = 32, seed: int = 0, noise: float = 0.15) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        size = image_size
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        disc = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 2) ** 2).float()
        for i in range(n):
            c = i % len(CLASSES)
            labels_idx, colour, (top, left), phrases = CLASSES[c]
            img = 0.25 * disc.expand(3, size, size).clone()
            scale = size / 32
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            y0, x0 = int(top * scale) + dy, int(left * scale) + dx
            s = max(int(10 * scale), 2)
            y0, x0 = max(0, min(size - s, y0)), max(0, min(size - s, x0))
            img[:, y0 : y0 + s, x0 : x0 + s] = torch.tensor(colour).view(3, 1, 1)
            img = img + noise * torch.randn(img.shape, generator=gen)
            image = (img - 0.45) / 0.27
            text = phrases[int(torch.randint(len(phrases), (1,), generator=gen))]
            labels = torch.zeros(NUM_LABELS)
            labels[list(labels_idx)] = 1.0
            self.items.append({"image": image.float(), "text": text, "labels": labels, "image_id": f"toy{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]
